"""MkDocs hooks of the rankbench site (``hooks:`` in ``mkdocs.yml``).

* The figures and raw outputs under ``benchmarks/results/`` (``*.png``, ``*.txt``) are served
  at ``assets/results/<path>``, straight from where the benchmarks write them: nothing is
  copied into ``docs/``, and ``mkdocs build --strict`` checks every link to them.
* ``docs/cluster.md`` is written by whoever owns the cluster guide; until it exists the nav
  entry gets a one-paragraph placeholder page, so the strict build stays clean.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SERVED = (".png", ".txt")

CLUSTER_PLACEHOLDER = """# Cluster

Running rankbench on a cluster (many machines sharing one study, a scheduler's time
limits) is being written up on this page. Until then: a study shared by several
machines is in [Studies](guide/studies.md#many-machines), and what SIGTERM and
preemption do to a run is in [Reliability](guide/reliability.md#stopping).
"""


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file() and path.suffix in SERVED:
            uri = "assets/results/" + path.relative_to(RESULTS).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    if files.get_file_from_path("cluster.md") is None:
        files.append(File.generated(config, "cluster.md", content=CLUSTER_PLACEHOLDER))
    return files
