"""From nothing to a report on one GPU (issue 24): regen (Magpie synthesis + the train-split prompts), train DSpark
(5 layers and 2 layers) online on the regenerated data, validate at T = 0 and T = 1 on the six held-out suites,
print the table. Driven by ``recipes/smollm2_from_nothing.yaml``; recipes/smollm2_from_nothing.sh runs it in a
lent-GPU call.

Stages, each skipped when its output is complete, each stopped at the call's deadline (``--seconds``):

1. ``regen``: the jobs of ``regen.synthesise.sources`` (each split into ``shards``, seeds apart) and ``regen.given``,
   ``regen.processes`` at a time, each ``python -m dspark_lightning regen`` with its config in ``<run>/configs/``
   and ``--time_limit_s`` set to the deadline (a synthesis resumes from its done-index, given prompts by id);
2. ``merge``: ``<run>/data/train.jsonl``, every conversation whose request is not a duplicate of an earlier file's
   (``data/dedup.py``), and ``<run>/data/data.json`` (rows, answer tokens and regen throughput per job);
3. ``fit``: every drafter of ``fit.drafters`` at once, ``last.ckpt`` every ``ckpt_every`` steps and at the deadline's
   SIGINT (``save_on_exception``), resumed from it;
4. ``validate``: every drafter at every temperature at once (``<run>/seed<S>/<drafter>/eval_T<T>/report.json``);
5. ``report``: ``recipes/smollm2_table.py``'s tables and ``<run>/report.json`` (per drafter and temperature: steps,
   macro tau, tau per suite; the answer tokens; regen throughput; each stage's seconds per call).

At the deadline a stage's processes get SIGINT, then SIGKILL 15 s later. The driver exits 0 and prints ``NEXT: call
again`` while work is left, ``DONE`` once the report is written.

    python recipes/smollm2_from_nothing.py --target /tmp/smol_hf --run /tmp/fn --seconds 520
    python recipes/smollm2_from_nothing.py --target /tmp/smol_hf --run /tmp/fn --dry-run   # the plan only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("regen", "merge", "fit", "validate", "report")
GRACE_S = 15  # between SIGINT and SIGKILL at the deadline
HEARTBEAT_S = 60  # a status line this often
MARGIN_S = 30  # a regen job is told to stop this long before the deadline (its last round and the copy-back)


@dataclass
class Job:
    """One process of a stage; ``done`` says whether its output is complete."""

    name: str
    argv: list[str]
    done: Callable[[], bool]
    time_limit: bool = False  # append --time_limit_s <seconds to the deadline - MARGIN_S>
    after: Callable[[], None] = lambda: None  # on exit 0
    setup: Callable[[], None] = lambda: None  # before the first start (e.g. the prompts file)
    progress: Callable[[], str] = lambda: ""  # a status line while it runs


@dataclass
class Plan:
    """Paths and settings of one run."""

    cfg: dict[str, Any]
    run: Path
    target: str
    python: str = sys.executable
    deadline: float = field(default_factory=lambda: time.monotonic() + 10**9)
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.run / "data"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def root(self, drafter: str) -> Path:
        return self.run / f"seed{self.cfg['seed']}" / drafter

    def target_block(self) -> dict[str, Any]:
        return {"path": self.target, "gguf_file": None, "dtype": self.cfg["target"]["dtype"]}

    def write_config(self, name: str, content: dict[str, Any]) -> Path:
        path = self.run / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(content, sort_keys=False)
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return path

    def module(self, *args: str) -> list[str]:
        return [self.python, "-m", "dspark_lightning", *args]


# ---------------------------------------------------------------------- files
def jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of ``path`` (none if missing; a partial last line is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- stage 1: regen
def synthesis_jobs(plan: Plan) -> list[Job]:
    syn = plan.cfg["regen"]["synthesise"]
    jobs = []
    for s, source in enumerate(syn["sources"]):
        shards = int(source.get("shards", 1))
        budget = int(syn["answer_tokens"] * source["share"] / shards)
        for k in range(shards):
            name = f"synth_{source['name']}_{k}"
            out = plan.data / f"{name}.jsonl"
            config = plan.write_config(f"regen_{name}", {
                **_regen_common(plan), "num_samples": syn["num_samples"], "max_answer_tokens": budget,
                "seed": plan.cfg["seed"] * 1000 + s * 100 + k,
                "synthesis": {**syn["prompt"], "system_prompt": source.get("system_prompt")}})
            jobs.append(Job(name, plan.module("regen", "synthesise", str(out), "--config", str(config)),
                            done=lambda out=out, budget=budget: synthesised_tokens(out) >= budget, time_limit=True,
                            progress=lambda out=out, budget=budget: f"{synthesised_tokens(out):,} of {budget:,} "
                                                                    f"answer tokens"))
    return jobs


def synthesised_tokens(out: Path) -> int:
    """Answer tokens of the finished rounds (the done-index)."""
    return sum(e.get("answer_tokens", 0) for e in jsonl(out.with_name(out.name + ".index.jsonl"))[1:])


def given_job(plan: Plan) -> Job:
    given = plan.cfg["regen"]["given"]
    prompts = plan.data / "given_prompts" / "shard0.jsonl"
    out = plan.data / "given.jsonl"
    config = plan.write_config("regen_given", {**_regen_common(plan), "num_samples": given["num_samples"],
                                               "max_prompts": given.get("max_prompts"), "seed": plan.cfg["seed"]})

    def setup() -> None:
        if not prompts.exists():
            subprocess.run([plan.python, str(REPO / "recipes/smollm2_prompts.py"), "--tokenizer", plan.target,
                            "--shards", "1", "--out", str(prompts.parent), "--max-prompt-tokens",
                            str(given["max_prompt_tokens"]), "--group", str(plan.cfg["regen"]["batch_size"])],
                           check=True)

    def counts() -> tuple[int, int]:
        dropped = len(jsonl(out.with_name(out.name + ".dropped.jsonl")))
        expected = (min(len(jsonl(prompts)), given.get("max_prompts") or 10**12) - dropped) * given["num_samples"]
        return len({r["id"] for r in jsonl(out)}), expected

    def done() -> bool:
        written, expected = counts()
        return prompts.exists() and written >= expected

    return Job("given", plan.module("regen", str(prompts), str(out), "--config", str(config)), done=done,
               time_limit=True, setup=setup, progress=lambda: "{:,} of {:,} conversations".format(*counts()))


def _regen_common(plan: Plan) -> dict[str, Any]:
    regen = plan.cfg["regen"]
    return {"backend": regen["backend"], "target": plan.target_block(), **regen["answer"],
            "batch_size": regen["batch_size"], "heldout": regen["heldout"], "progress": False}


def regen_jobs(plan: Plan) -> list[Job]:
    jobs = synthesis_jobs(plan)
    if plan.cfg["regen"].get("given"):
        jobs.append(given_job(plan))
    return jobs


# ---------------------------------------------------------------------- stage 2: merge
def merge(plan: Plan, jobs: list[Job]) -> None:
    """``train.jsonl``: the jobs' conversations in job order, requests that duplicate an earlier file's left out."""
    sys.path.insert(0, str(REPO))
    from dspark_lightning.data.dedup import NearDuplicateIndex

    index = NearDuplicateIndex()
    lines, per_job = [], {}
    for job in jobs:
        out = plan.data / f"{job.name}.jsonl"
        rows = jsonl(out)
        kept = 0
        tokens = 0
        for row in rows:
            request = next(m["content"] for m in row["conversations"] if m["role"] == "user")
            owner = index.find(request)
            if owner is not None and owner != (job.name, row.get("prompt_id")):
                continue  # a prompt another file (or another prompt) already holds
            if owner is None:
                index.add(request, (job.name, row.get("prompt_id")))
            lines.append(json.dumps(row, ensure_ascii=False))
            kept += 1
            tokens += sum(row["regen"].get("answer_tokens") or [])
        runs = jsonl(out.with_name(out.name + ".runs.jsonl"))
        per_job[job.name] = {"rows": len(rows), "kept": kept, "answer_tokens": tokens,
                             "answer_tokens_per_s": [r.get("answer_tokens_per_s") for r in runs]}
    total = sum(j["answer_tokens"] for j in per_job.values())
    write_atomic(plan.data / "train.jsonl", "".join(line + "\n" for line in lines))
    write_atomic(plan.data / "data.json", json.dumps({"conversations": len(lines), "answer_tokens": total,
                                                      "jobs": per_job}, indent=2))
    print(f"== merge: {len(lines):,} conversations, {total:,} answer tokens -> {plan.data / 'train.jsonl'}")


# ---------------------------------------------------------------------- stage 3: fit
def fit_jobs(plan: Plan) -> list[Job]:
    fit = plan.cfg["fit"]
    jobs = []
    for name, spec in fit["drafters"].items():
        root = plan.root(name)
        overlay = {
            "seed_everything": plan.cfg["seed"],
            "model": {"target": plan.target_block(), **({"drafter": spec["drafter"]} if spec.get("drafter") else {})},
            "data": {"init_args": {"path": str(plan.data / "train.jsonl"), "max_length": fit["max_length"],
                                   "batch_size": fit["batch_size"], "val_fraction": fit["val_fraction"],
                                   "num_workers": fit["num_workers"], "tokenize_workers": fit["tokenize_workers"]}},
            "trainer": {"max_steps": fit["steps"], "max_epochs": -1,
                        "val_check_interval": min(fit["val_every"], fit["steps"]), "check_val_every_n_epoch": None,
                        "num_sanity_val_steps": 0, "enable_progress_bar": False, "default_root_dir": str(root),
                        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"save_last": True, "every_n_train_steps": fit["ckpt_every"],
                                                     "save_on_exception": True}}],  # SIGINT at the deadline
                        **plan.cfg.get("trainer", {})},
        }
        config = plan.write_config(f"fit_{name}", overlay)
        last = root / "checkpoints" / "last.ckpt"
        argv = plan.module("fit", "--config", str(REPO / spec["config"]), "--config", str(config))
        if last.exists():
            argv += ["--ckpt_path", str(last)]
        done_file = root / "fit.done"
        jobs.append(Job(f"fit_{name}", argv, done=done_file.exists, after=done_file.touch))
    return jobs


# ---------------------------------------------------------------------- stage 4: validate
def validate_jobs(plan: Plan) -> list[Job]:
    val = plan.cfg["validate"]
    jobs = []
    for name, spec in plan.cfg["fit"]["drafters"].items():
        root = plan.root(name)
        for temperature in val["temperatures"]:
            out = root / f"eval_T{float(temperature)}"
            overlay = {
                "model": {"target": plan.target_block(),
                          **({"drafter": spec["drafter"]} if spec.get("drafter") else {}),
                          "decoding": {"init_args": {"temperature": float(temperature), "seed": plan.cfg["seed"],
                                                     "output_dir": str(out)}}},
                "data": {"init_args": {"max_samples": val["max_samples"], "max_new_tokens": val["max_new_tokens"],
                                       "batch_size": val["batch_size"]}},
                "trainer": {"default_root_dir": str(root), "enable_progress_bar": False, **plan.cfg.get("trainer", {})},
            }
            config = plan.write_config(f"validate_{name}_T{float(temperature)}", overlay)
            argv = plan.module("validate", "--config", str(REPO / spec["config"]), "--config",
                               str(REPO / "configs/smollm2/validate.yaml"), "--config", str(config),
                               "--ckpt_path", str(root / "checkpoints" / "last.ckpt"))
            jobs.append(Job(f"validate_{name}_T{float(temperature)}", argv, done=(out / "report.json").exists))
    return jobs


# ---------------------------------------------------------------------- stage 5: report
def report(plan: Plan) -> dict[str, Any]:
    subprocess.run([plan.python, str(REPO / "recipes/smollm2_table.py"), str(plan.run), "--png",
                    str(plan.run / "acceptance.png")], check=True)
    drafters = {}
    for name in plan.cfg["fit"]["drafters"]:
        root = plan.root(name)
        summaries = sorted(root.glob("**/summary.json"), key=lambda p: p.stat().st_mtime)
        fit = json.loads(summaries[-1].read_text()) if summaries else {}
        temps = {}
        for temperature in plan.cfg["validate"]["temperatures"]:
            path = root / f"eval_T{float(temperature)}" / "report.json"
            rep = json.loads(path.read_text())
            temps[f"{float(temperature)}"] = {"macro_tau": rep["macro_tau"],
                                              "tau": {s: v["tau"] for s, v in rep["suites"].items()}}
        drafters[name] = {"steps": fit.get("steps"), "val_metrics": fit.get("metrics"),
                          "tokens_per_s": (fit.get("throughput") or {}).get("tokens_per_s"), "validate": temps}
    data = json.loads((plan.data / "data.json").read_text())
    result = {"answer_tokens": data["answer_tokens"], "conversations": data["conversations"],
              "regen": data["jobs"], "drafters": drafters, "stages": jsonl(plan.run / "stages.jsonl")}
    write_atomic(plan.run / "report.json", json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------- running jobs under the deadline
def run_jobs(plan: Plan, stage: str, jobs: list[Job], parallel: int) -> bool:
    """Run the jobs not yet done, ``parallel`` at a time, until they end or the deadline; True when all are done."""
    pending = [j for j in jobs if not j.done()]
    if not pending:
        return True
    min_s = plan.cfg["call"]["min_seconds"][stage]
    if plan.left() < min_s:
        print(f"-- {stage}: {plan.left():.0f} s left, under the {min_s} s a start needs; next call")
        return False
    started = time.monotonic()
    logs = plan.run / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: list[tuple[Job, subprocess.Popen, Any]] = []
    queue = list(pending)
    heartbeat = time.monotonic()
    while queue or running:
        if time.monotonic() - heartbeat >= HEARTBEAT_S:
            heartbeat = time.monotonic()
            status = "; ".join(f"{j.name} {j.progress()}".strip() for j, _, _ in running)
            print(f"-- {stage} at {time.monotonic() - started:.0f} s ({plan.left():.0f} s left): {status}", flush=True)
        while queue and len(running) < parallel and plan.left() > min_s:
            job = queue.pop(0)
            job.setup()
            argv = job.argv + (["--time_limit_s", str(int(max(plan.left() - MARGIN_S, 1)))] if job.time_limit else [])
            log = (logs / f"{job.name}.log").open("a")
            log.write(f"\n== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n")
            log.flush()
            print(f"== {stage}: {job.name} (log {logs / job.name}.log)")
            running.append((job, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                                  start_new_session=True), log))
        if not running:
            break  # what is queued has no time to start
        time.sleep(1)
        if plan.left() <= 0:
            _interrupt([p for _, p, _ in running])
        for entry in list(running):
            job, proc, log = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            log.close()
            if proc.returncode == 0:
                job.after()
            else:
                tail = (logs / f"{job.name}.log").read_text(errors="replace").splitlines()[-12:]
                print(f"-- {job.name} exited {proc.returncode}:\n   " + "\n   ".join(tail))
    plan.log.append({"stage": stage, "seconds": round(time.monotonic() - started, 1),
                     "jobs": [j.name for j in pending]})
    with (plan.run / "stages.jsonl").open("a") as f:
        f.write(json.dumps(plan.log[-1]) + "\n")
    return all(j.done() for j in jobs)


def _interrupt(procs: list[subprocess.Popen]) -> None:
    """SIGINT to each process group (Lightning and regen stop cleanly), SIGKILL after GRACE_S."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
    end = time.monotonic() + GRACE_S
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def execute(plan: Plan, dry_run: bool = False) -> bool:
    """Every stage in order, as far as the deadline allows; True once the report is written."""
    regen = regen_jobs(plan)
    stages: list[tuple[str, Callable[[], list[Job]], int]] = [
        ("regen", lambda: regen, plan.cfg["regen"]["processes"]),
        ("fit", lambda: fit_jobs(plan), len(plan.cfg["fit"]["drafters"])),
        ("validate", lambda: validate_jobs(plan), 99),
    ]
    if dry_run:
        for stage, jobs, _ in stages:
            for job in jobs():
                state = "done" if job.done() else "to run"
                print(f"[{stage}] {job.name} ({state}): {' '.join(job.argv)}")
        return False
    for stage, jobs, parallel in stages:
        if stage == "fit" and not (plan.data / "train.jsonl").exists():
            merge(plan, regen)
        if not run_jobs(plan, stage, jobs(), parallel):
            return False
    result = report(plan)
    for name, d in result["drafters"].items():
        taus = ", ".join(f"T={t}: {v['macro_tau']:.3f}" for t, v in d["validate"].items())
        print(f"== {name}: {d['steps']} steps, macro tau {taus}")
    print(f"== {result['answer_tokens']:,} answer tokens trained on; report: {plan.run / 'report.json'}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "recipes/smollm2_from_nothing.yaml")
    parser.add_argument("--target", required=True, help="HF directory of the target (h200_prepare.sh convert)")
    parser.add_argument("--run", type=Path, required=True, help="where everything goes")
    parser.add_argument("--seconds", type=float, default=None, help="this call's time (default: no deadline)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = parser.parse_args()
    plan = Plan(yaml.safe_load(args.config.read_text()), args.run.resolve(), args.target)
    if args.seconds is not None:
        plan.deadline = time.monotonic() + args.seconds
    plan.run.mkdir(parents=True, exist_ok=True)
    finished = execute(plan, args.dry_run)
    if not args.dry_run:
        print("DONE" if finished else "NEXT: call again (every stage resumes)")


if __name__ == "__main__":
    main()
