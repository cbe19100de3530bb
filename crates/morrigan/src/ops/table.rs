//! Human output: aligned tables and field lists.

/// A table whose columns are as wide as their widest cell, separated by two spaces.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<const N: usize>(headers: [&str; N]) -> Self {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row<const N: usize>(&mut self, cells: [String; N]) {
        self.rows
            .push(cells.into_iter().map(|c| clean(&c)).collect());
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// `label: value` lines, labels aligned.
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
    for (label, value) in fields {
        println!("{:<width$} {}", format!("{label}:"), clean(value));
    }
}

/// No control characters in a cell (a client id or reason is free text).
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A value as a cell: the text as it is, an absent or empty one as `-`.
pub fn text<'a>(value: impl Into<Option<&'a str>>) -> String {
    match value.into() {
        None | Some("") => "-".into(),
        Some(s) => s.to_string(),
    }
}

/// An ISO 8601 timestamp shortened to `YYYY-MM-DD HH:MM:SS` (UTC); absent or empty as `-`.
pub fn short_time<'a>(value: impl Into<Option<&'a str>>) -> String {
    let full = text(value);
    if full.is_ascii() && full.len() >= 19 && full.as_bytes()[10] == b'T' {
        format!("{} {}", &full[..10], &full[11..19])
    } else {
        full
    }
}

/// A flag as `yes` or `no`.
pub fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_lines_do_not_trail() {
        let mut t = Table::new(["ID", "NAME"]);
        t.row(["1".into(), "alpha".into()]);
        t.row(["12345".into(), "b\nc".into()]);
        assert_eq!(t.render(), "ID     NAME\n1      alpha\n12345  b c\n");
    }

    #[test]
    fn fields_and_times() {
        assert_eq!(text("x"), "x");
        assert_eq!(text(None), "-");
        assert_eq!(text(""), "-");
        assert_eq!(
            short_time("2024-05-06T07:08:09.123Z"),
            "2024-05-06 07:08:09"
        );
        assert_eq!(short_time(None), "-");
        assert_eq!(yes_no(true), "yes");
        assert_eq!(yes_no(false), "no");
    }
}
