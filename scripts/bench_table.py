#!/usr/bin/env python3
"""Turns morrigan-bench JSON lines into the results table of BENCHMARKS.md (between markers)."""
import json, sys, subprocess, platform, os

results, md = sys.argv[1], sys.argv[2]
# The tracked-messaging table compares with the untracked sends of this size.
send_n = sys.argv[3] if len(sys.argv) > 3 else "1000"
runs = {}
for line in open(results):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        runs[r["label"]] = r

def phase(r, name):
    for p in r["phases"]:
        if p["phase"] == name:
            return p
    return {}

def fmt(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"

def ratio(m, b):
    return "-" if not m or not b else f"{m / b:.2f}×"

rows = []
def row(what, b, m, d=0, note=""):
    rows.append(f"| {what} | {fmt(b, d)} | {fmt(m, d)} | {ratio(m, b)} | {note} |")

labels = sorted({k.split("/", 1)[1] for k in runs}, key=lambda s: (s.split("-")[0], int(s.split("-")[-1]) if s.split("-")[-1].isdigit() else 0))
for label in labels:
    b, m = runs.get("bare/" + label), runs.get("morrigan/" + label)
    if not b or not m:
        continue
    kind = label.split("-")[0]
    if kind == "connect":
        bc, mc = phase(b, "connect"), phase(m, "connect")
        bh, mh = phase(b, "hold"), phase(m, "hold")
        n = m["connections"]
        row(f"{label}: connects/s", bc.get("rate_per_s"), mc.get("rate_per_s"), 0, f"failures bare {sum(bc.get('failures', {}).values())}, morrigan {sum(mc.get('failures', {}).values())}")
        row(f"{label}: connect p99 ms", bc["latency"]["p99_ms"], mc["latency"]["p99_ms"], 1)
        row(f"{label}: server CPU µs/connect", bc.get("server_cpu_us_per_op"), mc.get("server_cpu_us_per_op"), 0)
        row(f"{label}: server RSS KiB/conn (held)", bh.get("server_rss_kib_per_conn"), mh.get("server_rss_kib_per_conn"), 2, f"held {mh.get('held')}/{n}, drops {mh.get('drops')} over {mh.get('wall_s', 0):.0f} s")
        row(f"{label}: idle CPU, % of a core per 10k conns", bh.get("server_pct_core_per_10k"), mh.get("server_pct_core_per_10k"), 3, "pings every 30 s")
    elif kind == "send":
        bs, ms = phase(b, "send"), phase(m, "send")
        row(f"{label}: REST sends/s", bs.get("rate_per_s"), ms.get("rate_per_s"), 0, f"lost bare {bs.get('lost')}, morrigan {ms.get('lost')}; failures {sum(ms.get('failures', {}).values())}")
        row(f"{label}: server CPU µs/send", bs.get("server_cpu_us_per_op"), ms.get("server_cpu_us_per_op"), 0)
        row(f"{label}: e2e p50 ms (REST → device)", bs["e2e"]["p50_ms"], ms["e2e"]["p50_ms"], 2)
        row(f"{label}: e2e p99 ms (REST → device)", bs["e2e"]["p99_ms"], ms["e2e"]["p99_ms"], 2)
    elif kind == "churn":
        bs, ms = phase(b, "churn"), phase(m, "churn")
        row(f"{label}: cycles/s", bs.get("rate_per_s"), ms.get("rate_per_s"), 0, f"failures {sum(ms.get('failures', {}).values())}")
        row(f"{label}: server CPU µs/cycle", bs.get("server_cpu_us_per_op"), ms.get("server_cpu_us_per_op"), 0)

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return "?"

mem = sh("free -g | awk '/Mem:/{print $2}'")
machine = (f"Machine: {sh('nproc')} cores, {mem} GiB, kernel {platform.release()}, {sh('rustc --version')}; "
           f"generated {sh('date -u +%Y-%m-%dT%H:%MZ')}.")
table = "\n".join([machine, "", "| measurement | bare floor | Morrigan | Morrigan / floor | notes |", "|---|---:|---:|---:|---|"] + rows)

text = open(md).read()
begin, end = "<!-- results:begin -->", "<!-- results:end -->"
i, j = text.index(begin) + len(begin), text.index(end)
open(md, "w").write(text[:i] + "\n" + table + "\n" + text[j:])

# ----- tracked messaging: tracked sends against the untracked sends of the same run, and the
# outbox drain (a second table, between its own markers) -----

def phase_of(r, name):
    return phase(r, name) if r else {}

base = phase_of(runs.get(f"morrigan/send-{send_n}"), "send")
trows = []
def trow(what, v, d=0, ref=None, note=""):
    r = "-" if not v or not ref else f"{v / ref:.2f}×"
    trows.append(f"| {what} | {fmt(v, d)} | {r} | {note} |")

trow(f"untracked sends/s ({send_n} held)", base.get("rate_per_s"), 0, base.get("rate_per_s"),
    f"REST p50 {fmt(base.get('latency', {}).get('p50_ms'), 2)} ms, p99 {fmt(base.get('latency', {}).get('p99_ms'), 2)} ms")
for track in ("ack", "reply"):
    p = phase_of(runs.get(f"morrigan/tracked-{track}-{send_n}"), "send")
    lat = p.get("latency", {})
    trow(f"{'acked sends' if track == 'ack' else 'requests with reply'}/s", p.get("rate_per_s"), 0,
        base.get("rate_per_s"),
        f"round trip p50 {fmt(lat.get('p50_ms'), 2)} ms, p99 {fmt(lat.get('p99_ms'), 2)} ms; "
        f"failures {sum(p.get('failures', {}).values())}")
    trow(f"server CPU µs per {track}ed send" if track == "ack" else "server CPU µs per request with reply",
        p.get("server_cpu_us_per_op"), 0, base.get("server_cpu_us_per_op"), "ratio: to an untracked send")
for label, r in sorted(runs.items()):
    if not label.startswith("morrigan/outbox-"):
        continue
    q, d = phase_of(r, "queue"), phase_of(r, "drain")
    n = r["connections"]
    trow(f"outbox: {n} devices × 10 queued, delivered messages/s on reconnect", d.get("rate_per_s"), 0, None,
        f"{fmt(d.get('ok'))} delivered in {fmt(d.get('wall_s'), 1)} s; per device p50 {fmt(d.get('latency', {}).get('p50_ms'), 0)} ms, "
        f"p99 {fmt(d.get('latency', {}).get('p99_ms'), 0)} ms; failures {sum(d.get('failures', {}).values())}")
    trow("outbox: queued messages/s (client sends, offline)", q.get("rate_per_s"), 0, None,
        f"failures {sum(q.get('failures', {}).values())}")

ttable = "\n".join(["| measurement | value | ratio | notes |", "|---|---:|---:|---|"] + trows)
text = open(md).read()
begin, end = "<!-- tracked:begin -->", "<!-- tracked:end -->"
if begin not in text:
    text += f"\n## Tracked messaging\n\n{begin}\n{end}\n"
i, j = text.index(begin) + len(begin), text.index(end)
open(md, "w").write(text[:i] + "\n" + ttable + "\n" + text[j:])
