"""recipes/smollm2_from_nothing.py: the plan it derives from its YAML, the skip-when-done rules, the merge, and the
job runner's deadline (SIGINT, then the next call)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fn():
    spec = importlib.util.spec_from_file_location("smollm2_from_nothing", ROOT / "recipes/smollm2_from_nothing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def plan(fn, tmp_path):
    cfg = yaml.safe_load((ROOT / "recipes/smollm2_from_nothing.yaml").read_text())
    return fn.Plan(cfg, tmp_path / "run", "/tmp/smol_hf")


def test_regen_jobs_share_the_budget_and_differ_in_seed(fn, plan):
    jobs = fn.regen_jobs(plan)
    syn = plan.cfg["regen"]["synthesise"]
    synth = [j for j in jobs if j.name.startswith("synth_")]
    configs = [yaml.safe_load(Path(j.argv[j.argv.index("--config") + 1]).read_text()) for j in synth]
    assert sum(c["max_answer_tokens"] for c in configs) == syn["answer_tokens"]
    assert len({c["seed"] for c in configs}) == len(configs) > 1
    for job, config in zip(synth, configs):
        assert job.argv[3:5] == ["regen", "synthesise"] and job.time_limit
        assert config["heldout"] == ["gsm8k", "math500-heldout", "aime25", "humaneval", "mbpp", "mt-bench"]
        assert config["target"] == {"path": "/tmp/smol_hf", "gguf_file": None, "dtype": "bfloat16"}
        assert config["synthesis"]["top_p"] == 0.95 and config["backend"] == "engine"
    assert [j.name for j in jobs][-1] == "given"


def test_regen_configs_parse_as_regen_arguments(fn, plan):
    from jsonargparse import ArgumentParser

    from dspark_lightning.data.regen import regen

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(regen, as_positional=True)
    for job in fn.regen_jobs(plan):
        args = parser.parse_args(job.argv[4:] + ["--time_limit_s", "60"])
        assert args.time_limit_s == 60 and args.batch_size == plan.cfg["regen"]["batch_size"]
        assert args.input == ("synthesise" if job.name.startswith("synth_") else job.argv[4])


def test_fit_and_validate_overlays(fn, plan):
    fits = {j.name: j for j in fn.fit_jobs(plan)}
    assert set(fits) == {"fit_dspark", "fit_dspark_2layer"}
    overlay = yaml.safe_load(Path(fits["fit_dspark_2layer"].argv[-1]).read_text())
    assert overlay["model"]["drafter"] == {"num_hidden_layers": 2}
    assert "drafter" not in yaml.safe_load(Path(fits["fit_dspark"].argv[-1]).read_text())["model"]
    assert overlay["data"]["init_args"]["path"] == str(plan.data / "train.jsonl")
    assert overlay["trainer"]["callbacks"][0]["init_args"] == {"save_last": True, "every_n_train_steps": 100,
                                                               "save_on_exception": True}
    assert overlay["trainer"]["max_steps"] == plan.cfg["fit"]["steps"] and "--ckpt_path" not in fits["fit_dspark"].argv
    # A fit cut off by a deadline resumes from its last checkpoint; a finished one is done.
    last = plan.root("dspark") / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    resumed = next(j for j in fn.fit_jobs(plan) if j.name == "fit_dspark")
    assert resumed.argv[-2:] == ["--ckpt_path", str(last)] and not resumed.done()
    resumed.after()
    assert resumed.done()
    vals = fn.validate_jobs(plan)
    assert len(vals) == 4 and {v.name for v in vals} >= {"validate_dspark_2layer_T0.0", "validate_dspark_T1.0"}
    two = next(v for v in vals if v.name == "validate_dspark_2layer_T0.0")
    overlay = yaml.safe_load(Path(two.argv[two.argv.index("--ckpt_path") - 1]).read_text())
    assert overlay["model"]["drafter"] == {"num_hidden_layers": 2}
    assert overlay["model"]["decoding"]["init_args"]["temperature"] == 0.0
    assert str(ROOT / "configs/smollm2/validate.yaml") in two.argv
    report = plan.root("dspark_2layer") / "eval_T0.0" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    assert two.done()


def test_a_synthesis_job_is_done_once_its_index_holds_the_budget(fn, plan):
    job = fn.synthesis_jobs(plan)[0]
    out = Path(job.argv[5])
    index = out.with_name(out.name + ".index.jsonl")
    index.parent.mkdir(parents=True)
    budget = yaml.safe_load(Path(job.argv[-1]).read_text())["max_answer_tokens"]
    index.write_text(json.dumps({"settings": {}}) + "\n" + json.dumps({"round": 0, "answer_tokens": budget - 1}) + "\n")
    assert not job.done()
    with index.open("a") as f:
        f.write(json.dumps({"round": 1, "answer_tokens": 1}) + "\n")
    assert job.done()


def conversation(pid: str, request: str, tokens: int) -> dict:
    return {"id": pid, "prompt_id": pid, "conversations": [{"role": "user", "content": request},
                                                           {"role": "assistant", "content": "ok"}],
            "regen": {"answer_tokens": [tokens]}}


def test_merge_keeps_each_request_once_and_counts_the_tokens(fn, plan):
    plan.data.mkdir(parents=True)
    a = [conversation("a0", "Write a poem about the sea.", 10), conversation("a1", "List three facts.", 5)]
    b = [conversation("b0", "write a POEM about the sea", 7), conversation("b1", "Explain the sky.", 3)]
    for name, rows in (("one", a), ("two", b)):
        (plan.data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs = [fn.Job(name, [], done=lambda: True) for name in ("one", "two")]
    fn.merge(plan, jobs)
    merged = [json.loads(line)["id"] for line in (plan.data / "train.jsonl").read_text().splitlines()]
    assert merged == ["a0", "a1", "b1"]
    data = json.loads((plan.data / "data.json").read_text())
    assert data["answer_tokens"] == 18 and data["jobs"]["two"] == {"rows": 2, "kept": 1, "answer_tokens": 3,
                                                                  "answer_tokens_per_s": []}


def test_the_runner_interrupts_at_the_deadline_and_skips_what_is_done(fn, plan, tmp_path, monkeypatch):
    monkeypatch.setattr(fn, "GRACE_S", 2)
    plan.cfg["call"]["min_seconds"]["regen"] = 0
    marker = tmp_path / "interrupted"
    sleeper = [sys.executable, "-c", "import sys, time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
               f"    open({str(marker)!r}, 'w').write('SIGINT')\n    sys.exit(1)"]
    finished = tmp_path / "finished"
    quick = [sys.executable, "-c", "pass"]
    jobs = [fn.Job("slow", sleeper, done=lambda: False),
            fn.Job("quick", quick, done=finished.exists, after=finished.touch),
            fn.Job("old", ["false"], done=lambda: True)]  # done before: never started
    plan.run.mkdir(parents=True)
    plan.deadline = time.monotonic() + 3
    start = time.monotonic()
    assert fn.run_jobs(plan, "regen", jobs, parallel=2) is False
    assert time.monotonic() - start < 10 and marker.read_text() == "SIGINT" and finished.exists()
    assert "old" not in (plan.run / "logs").iterdir().__str__() and not (plan.run / "logs" / "old.log").exists()
    stage = json.loads((plan.run / "stages.jsonl").read_text().splitlines()[-1])
    assert stage["stage"] == "regen" and stage["jobs"] == ["slow", "quick"]
    # Under the seconds a start needs, nothing starts: the next call does it.
    plan.cfg["call"]["min_seconds"]["regen"] = 90
    assert fn.run_jobs(plan, "regen", [fn.Job("slow", sleeper, done=lambda: False)], parallel=1) is False
    assert (plan.run / "logs" / "slow.log").read_text().count("== ") == 1
