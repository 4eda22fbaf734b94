"""bench/compare_goodput.py re-scores a sweep's requests against other SLOs, from its per-request rows."""

from __future__ import annotations

import gzip
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def sweep(path: pathlib.Path, rows: list[tuple[float, float | None, str]], elapsed_s: float) -> None:
    requests = [{"status": status, "ttft_s": ttft, "tpot_s": tpot} for ttft, tpot, status in rows]
    ok = [r for r in requests if r["status"] == "OK"]
    summary = {"slo": {"ttft_s": 0.5, "tpot_s": 0.05}, "elapsed_s": elapsed_s, "goodput": len(ok) / elapsed_s,
               "ttft_s_90": 0.2, "tpot_s_90": 0.02}
    data = json.dumps({"runs": [{"rate": 4.0, "summary": summary, "requests": requests}]})
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data.encode()))
    else:
        path.write_text(data)


def compare(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_goodput.py"), *args],
                         check=True, capture_output=True, text=True)
    return json.loads(pathlib.Path(args[args.index("--json") + 1]).read_text()) | {"stdout": out.stdout}


def test_rescoring_counts_only_requests_inside_the_new_slos(tmp_path: pathlib.Path) -> None:
    d, a, j = tmp_path / "d.json.gz", tmp_path / "a.json", str(tmp_path / "cmp.json")
    # TPOT 8, 12, 30 ms (one request failed, one with a single token: no TPOT); TTFT 0.1-0.6 s.
    sweep(d, [(0.1, 0.008, "OK"), (0.2, 0.012, "OK"), (0.3, 0.030, "OK"), (0.1, None, "OK"),
              (0.1, 0.001, "DEADLINE_EXCEEDED")], elapsed_s=2.0)
    sweep(a, [(0.1, 0.008, "OK"), (0.6, 0.008, "OK"), (0.2, 0.020, "OK")], elapsed_s=1.0)
    as_ran = compare(str(d), str(a), "--json", j)
    assert (as_ran["peak_goodput_d"], as_ran["peak_goodput_a"]) == (2.0, 3.0)  # the sweep's own figures
    tight = compare(str(d), str(a), "--json", j, "--slo-tpot-ms", "10")
    assert (tight["peak_goodput_d"], tight["peak_goodput_a"]) == (1.0, 1.0)  # d: 8 ms and no-TPOT; a: 8 ms, 0.1 s
    both = compare(str(d), str(a), "--json", j, "--slo-tpot-ms", "25", "--slo-ttft-ms", "150")
    assert (both["peak_goodput_d"], both["peak_goodput_a"]) == (1.0, 1.0)  # d: 0.1 s/8 ms, 0.1 s/None; a: first


def test_rescoring_needs_per_request_rows(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"runs": [{"rate": 1.0, "summary": {"slo": {"ttft_s": 0.5, "tpot_s": 0.05}}}]}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_goodput.py"), str(path), str(path),
                          "--slo-tpot-ms", "10"], capture_output=True, text=True)
    assert out.returncode != 0 and "no per-request rows" in out.stderr


def test_the_ratio_comes_with_its_counting_interval(tmp_path: pathlib.Path) -> None:
    d, a, j = tmp_path / "d.json", tmp_path / "a.json", str(tmp_path / "cmp.json")
    # 90 of 100 requests in SLO in each run, over the same 10 s: ratio 1, uncertain by the count alone (the
    # helper's summary counts every OK request as good; the interval recounts them against the SLOs); requests a
    # run never sent are not resampled
    sweep(d, [(0.1, 0.01, "OK")] * 90 + [(0.9, 0.01, "OK")] * 10 + [(None, None, "NOT_SENT")] * 50, elapsed_s=10.0)
    sweep(a, [(0.1, 0.01, "OK")] * 90 + [(0.1, 0.09, "OK")] * 10, elapsed_s=10.0)
    (row,) = compare(str(d), str(a), "--json", j)["rows"]
    lo, hi = row["ratio_ci95"]
    assert row["ratio"] == 1.0 and 0.88 < lo < 0.97 and 1.03 < hi < 1.13, (lo, hi)
    assert "| 4 | 10.00 | 10.00 | 1.000 (" in compare(str(d), str(a), "--json", j)["stdout"]
    (row,) = compare(str(d), str(a), "--json", j, "--bootstrap", "0")["rows"]
    assert row["ratio_ci95"] is None
