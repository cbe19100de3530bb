//! Secrets on disk: identity tokens, user tokens, signing keys, generated passwords.
//!
//! [`write_private`] is the one way Morrigan writes such a file: a reader (or a restart after a
//! crash) finds the old content or the new content, whole, and nobody but the owner can read it.
//! [`create_private_dir`] makes the directory that holds such files, owner only.

use std::collections::hash_map::RandomState;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How many temporary names are tried before giving up (each is random: a clash means a stale
/// temporary file of a crashed writer, or a concurrent writer, holds that name).
const TEMP_ATTEMPTS: usize = 8;

/// Replaces the file at `path` with `bytes`, atomically and readable by the owner only.
///
/// What it guarantees:
///
/// * **Whole or nothing.** The bytes go to a new temporary file in the same directory
///   (`.<name>.<16 hex digits>.tmp`), which is synced to disk and then renamed over `path`. A
///   reader, or the system after a crash, sees the old file or the new one, never a truncated
///   or partly written one; a reader that opened the old file keeps reading the old content.
/// * **Private from the start.** On Unix the temporary file is created with mode 0600, so the
///   secret is never readable by others, not even for a moment; the new file does not inherit
///   the mode of the one it replaces. The temporary file is created exclusively (`O_EXCL`),
///   so a symbolic link planted at its name is never followed.
/// * **Durable once `Ok`.** The file's content is synced before the rename, and the directory
///   after it so that the rename survives a crash too (the directory sync is skipped where the
///   directory cannot be opened for it, e.g. without read permission: the file is then in
///   place and whole, but a crash may still bring back the old one).
/// * **Nothing changed on `Err`.** The rename is the last step that can fail: on any error the
///   file at `path` is as it was, and no temporary file is left behind.
///
/// The directory must exist (see [`create_private_dir`]). Concurrent writers of one path each
/// use their own temporary file; the last rename wins.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    let dir = parent_dir(path);
    let (tmp, file) = create_temp(&dir, name)?;
    let result = fill(file, bytes).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&dir);
    Ok(())
}

/// Creates `dir` and any missing parents; on Unix the ones it creates get mode 0700 (owner
/// only). An existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A new temporary file beside the target, created exclusively with mode 0600.
fn create_temp(dir: &Path, name: &OsStr) -> io::Result<(PathBuf, File)> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut clash = None;
    for _ in 0..TEMP_ATTEMPTS {
        let tmp = dir.join(temp_name(name));
        match options.open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => clash = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(clash.unwrap_or_else(|| io::Error::other("no free temporary file name")))
}

/// `.<name>.<16 hex digits>.tmp`: hidden, beside the target, and unique per call (a per-process
/// counter and the process id, hashed with a randomly keyed hasher).
fn temp_name(name: &OsStr) -> OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{:016x}.tmp", hasher.finish()));
    tmp
}

fn fill(mut file: File, bytes: &[u8]) -> io::Result<()> {
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes a rename in `dir` durable, where the platform allows it.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<OsString> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_and_replaces_leaving_only_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"one").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_private(&path, b"two, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two, longer");
        write_private(&path, b"3").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"3");
        // The temporary files were renamed, not copied.
        assert_eq!(names(dir.path()), ["secret"]);
    }

    #[test]
    #[cfg(unix)]
    fn the_file_is_private_even_when_it_replaces_a_readable_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn replaces_the_file_whole_never_rewrites_it_in_place() {
        // A reader that opened the old file before a write still reads the old content whole:
        // the new content went to another file, renamed over the old name (a write that
        // truncated and rewrote the file would let a crash leave it empty or partial).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"old.token.value").unwrap();
        let mut before = File::open(&path).unwrap();
        write_private(&path, b"new.token.value").unwrap();
        let mut old = String::new();
        io::Read::read_to_string(&mut before, &mut old).unwrap();
        assert_eq!(old, "old.token.value");
        assert_eq!(fs::read(&path).unwrap(), b"new.token.value");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_failed_write_keeps_the_old_file() {
        // A directory whose path is so long that the file's path fits under Linux's PATH_MAX
        // (4096 bytes with the NUL) but the temporary file's (22 bytes longer) does not: the
        // write fails before the old file is touched. Unix permissions cannot make it fail:
        // the tests may run as root.
        let root = tempfile::tempdir().unwrap();
        let mut dir = root.path().to_path_buf();
        let target = 4070;
        while dir.as_os_str().len() < target {
            let room = target - dir.as_os_str().len() - 1;
            dir.push("d".repeat(room.clamp(1, 200)));
        }
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("identity-token");
        assert!(path.as_os_str().len() < 4096);
        fs::write(&path, "a.b.c").unwrap();

        write_private(&path, b"x.y.z").unwrap_err();
        assert_eq!(fs::read(&path).unwrap(), b"a.b.c");
        assert_eq!(names(&dir), ["identity-token"]);
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_file() {
        // A directory where the file should be: the temporary file is written, the rename over
        // the directory fails, and the temporary file must go.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("kept"), "x").unwrap();

        write_private(&path, b"x.y.z").unwrap_err();
        assert_eq!(names(dir.path()), ["secret"]);
        assert_eq!(names(&path), ["kept"]);
    }

    #[test]
    fn a_missing_directory_is_an_error_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("secret");
        let err = write_private(&path, b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_private(&dir.path().join(".."), b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn temporary_names_are_hidden_beside_the_target_and_unique() {
        assert_eq!(parent_dir(Path::new("token")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/token")), Path::new("a"));
        let first = temp_name(OsStr::new("token"));
        let second = temp_name(OsStr::new("token"));
        assert_ne!(first, second);
        let text = first.to_str().unwrap();
        assert!(
            text.starts_with(".token.") && text.ends_with(".tmp"),
            "{text}"
        );
        assert_eq!(text.len(), ".token.".len() + 16 + ".tmp".len());
    }

    #[test]
    #[cfg(unix)]
    fn private_dirs_are_owner_only_and_existing_ones_untouched() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a").join("b");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o750);
    }
}
