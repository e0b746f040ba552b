"""Runs are never mixed or lost (issue 14): fingerprint checked on resume, a lock on output_dir, corrupt
checkpoints named and restarted, finished results written as they finish, kill -9 then resume = the
uninterrupted run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from modnet.cli import main
from tests.test_faults import rejected_before_torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["cl", "strategies=[modnet,naive]", "train.epochs=1", "benchmark.n_experiences=2", "progress=false"]


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _matrices(folder: Path) -> dict:
    res = json.loads((folder / "results.json").read_text())
    return {name: r["accuracy_matrix"] for name, r in res["strategies"].items()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main([*TINY, f"output_dir={out}"]) == 0
    return out


def test_fingerprint_stored_in_folder_and_every_checkpoint(tiny_run):
    import torch

    stored = json.loads((tiny_run / "fingerprint.json").read_text())
    assert stored["config.train.epochs"] == 1 and stored["config.strategies"] == ["modnet", "naive"]
    assert {"version.torch", "version.avalanche", "version.modnet"} <= set(stored)
    assert not any(k.startswith(("config.output_dir", "config.progress", "config.resume", "config.loggers",
                                 "config.threads")) for k in stored)
    for name in ("modnet", "naive"):
        state = torch.load(tiny_run / "checkpoints" / f"{name}_seed0.pt", weights_only=True)
        assert json.loads(state["fingerprint"]) == stored
    assert not (tiny_run / ".lock").exists()  # released at the end


@pytest.mark.parametrize("change, key", [("train.epochs=2", "train.epochs"),
                                         ("strategies=[modnet]", "strategies"),
                                         ("benchmark.n_experiences=5", "benchmark.n_experiences")])
def test_resume_with_another_fingerprint_stops_and_overwrites_nothing(tiny_run, tmp_path, capsys, change, key):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = _snapshot(out)
    capsys.readouterr()
    args = [a for a in TINY if a.split("=")[0] != change.split("=")[0]]
    assert main([*args, change, f"output_dir={out}", "resume=true"]) == 2
    _one_error_line(capsys, key, "resume=true")
    assert _snapshot(out) == before  # config.yaml, results, checkpoints: untouched


def test_resume_with_the_same_settings_but_other_output_keys_is_allowed(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    assert main([*TINY, f"output_dir={out}", "resume=true", "threads=2", "loggers=[]"]) == 0
    assert _matrices(out) == _matrices(tiny_run)


def test_checkpoint_of_another_run_is_refused(tiny_run, tmp_path, capsys):
    """fingerprint.json missing (an older folder): each checkpoint's own fingerprint is checked."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / "fingerprint.json").unlink()
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*TINY, "train.lr=0.01", f"output_dir={out}", "resume=true"]) == 2
    _one_error_line(capsys, "modnet_seed0.pt", "train.lr")
    assert _snapshot(out) == before


def test_second_run_into_a_folder_in_use_stops_at_once(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    import socket

    (out / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")  # a live process holds it
    assert main([*TINY, f"output_dir={out}"]) == 2  # before any training: nothing but the lock in the folder
    _one_error_line(capsys, "in use", str(os.getpid()), ".lock")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket

    from modnet.rundir import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    with RunLock(tmp_path) as lock:
        assert (tmp_path / ".lock").read_text().split()[1] == str(os.getpid()) and lock.held
        with pytest.raises(Exception, match="in use"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()


def _race_for_the_lock(folder, start, won) -> None:
    from modnet.rundir import RunLock

    lock = RunLock(folder)
    start.wait()
    try:
        lock.acquire()
    except Exception:  # noqa: BLE001 - "in use": lost the race
        return
    with won.get_lock():
        won.value += 1
    time.sleep(0.5)  # holds the folder while the others try
    lock.release()


def test_a_stale_lock_is_taken_over_by_one_run_only(tmp_path):
    """Runs that read a dead run's lock at the same moment each took it over: one deleted the fresh lock of
    another and both wrote into the folder (2 of 3 processes in 17 of 20 trials). Now exactly one wins."""
    import multiprocessing as mp
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ctx = mp.get_context("fork")
    for trial in range(6):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        (folder / ".lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
        start, won = ctx.Barrier(4), ctx.Value("i", 0)
        procs = [ctx.Process(target=_race_for_the_lock, args=(folder, start, won)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert won.value == 1, (trial, won.value)
        assert not (folder / ".lock").exists()


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert main([*TINY, f"output_dir={tmp_path / 'f'}"]) == 2
    _one_error_line(capsys, "is a file", "output_dir")
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("damage", ["empty", "truncated", "pickle"])
def test_corrupt_checkpoint_is_named_and_its_strategy_restarts(tiny_run, tmp_path, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    ckpt = out / "checkpoints" / "modnet_seed0.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."}[damage])
    capsys.readouterr()
    assert main([*TINY, f"output_dir={out}", "resume=true"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "modnet_seed0.pt" in warnings[0] and "Traceback" not in err, err
    assert (out / "checkpoints" / "modnet_seed0.pt.corrupt").exists()  # kept aside, not overwritten
    assert _matrices(out) == _matrices(tiny_run)  # restarted cleanly: the numbers of the first run


def _wait_for(path: Path, proc, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


KILL_ARGS = ["cl", "strategies=[modnet,naive]", "train.epochs=1", "benchmark.n_experiences=5", "progress=false"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main([*KILL_ARGS, f"output_dir={out}"]) == 0
    return _matrices(out)


@pytest.mark.parametrize("kill_after", ["modnet_seed0.pt", "naive_seed0.pt"])
def test_kill9_then_resume_gives_the_results_of_an_uninterrupted_run(tmp_path, kill_after, uninterrupted):
    """kill -9 after the first checkpoint of modnet (gated, default: mid-strategy) or of naive (modnet
    finished: its results are already in results.json); resume=true ends with the same accuracy matrices
    as an uninterrupted run, bit for bit."""
    args = KILL_ARGS
    proc = subprocess.Popen([sys.executable, "-m", "modnet.cli", *args, f"output_dir={tmp_path / 'cut'}"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "cut" / "checkpoints" / kill_after, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "cut" / ".lock").exists()  # left by the killed run: stale
    if kill_after == "naive_seed0.pt":
        partial = json.loads((tmp_path / "cut" / "results.json").read_text())
        assert partial["complete"] is False and "modnet" in partial["strategies"]
    assert main([*args, f"output_dir={tmp_path / 'cut'}", "resume=true"]) == 0
    resumed, full = _matrices(tmp_path / "cut"), uninterrupted
    assert set(resumed) == {"modnet", "naive"}
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], full[name])
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["complete"] is True


def test_empty_lock_file_is_stale_only_when_old(tmp_path):
    from modnet.config import ConfigError
    from modnet.rundir import RunLock

    (tmp_path / ".lock").write_text("")  # a run killed between creating and writing its lock
    with pytest.raises(ConfigError, match="in use"):
        RunLock(tmp_path).acquire()
    os.utime(tmp_path / ".lock", (time.time() - 120, time.time() - 120))
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().split()[1] == str(os.getpid())


def test_offline_download_is_one_line(monkeypatch, capsys):
    import modnet.cli as cli

    def offline(job, overrides):
        raise ConnectionError("could not download CIFAR10 to data (URLError); this machine seems offline")

    monkeypatch.setattr(cli, "_call", offline)
    assert main(["cl", "benchmark=cifar10", "benchmark.download=true"]) == 2
    _one_error_line(capsys, "CIFAR10", "offline")


def test_a_job_leaves_torchs_threads_as_it_found_them(monkeypatch):
    """`modnet run` calls cl (threads=1), then gzsl, whose threads=null means torch's default as the process
    had it: each job's thread count ends with the job, also when it fails."""
    import torch

    import modnet.jobs.cl as cl_job
    from modnet.cli import _call

    seen = []

    def job(cfg):
        torch.set_num_threads(int(cfg.threads))
        seen.append(torch.get_num_threads())
        return {}

    def failing(cfg):
        torch.set_num_threads(1)
        raise RuntimeError("the job failed")

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the caller's count, other than the job's 1
        monkeypatch.setattr(cl_job, "run_cl", job)
        assert _call("cl", ["threads=1"]) == {} and seen == [1]
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(cl_job, "run_cl", failing)
        with pytest.raises(RuntimeError, match="the job failed"):
            _call("cl", [])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_ddp_into_a_folder_in_use_stops_before_starting_processes(tmp_path, capsys, monkeypatch):
    """`modnet ddp` holds output_dir as `modnet cl` does: a folder in use stops the launcher at once, before
    torchrun starts any process, and nothing is written there. The launcher composes and checks the config once:
    the checks `modnet.cli` ran before torch's import are the ones it goes on with."""
    import socket

    import modnet.config

    composed = []
    compose = modnet.config.compose
    monkeypatch.setattr(modnet.config, "compose", lambda *a, **k: composed.append(a[0]) or compose(*a, **k))
    out = tmp_path / "busy"
    out.mkdir()
    (out / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    assert main(["ddp", "--nproc", "2", "strategies=[naive]", "train.epochs=1", "progress=false",
                 f"output_dir={out}"]) == 2
    _one_error_line(capsys, "in use", str(os.getpid()), ".lock")
    assert composed == ["cl"]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_ddp_launcher_checks_what_modnet_cl_checks(tmp_path, capsys):
    """`modnet ddp` is `modnet cl` under torchrun: a value `modnet cl` refuses stops the launcher with the same
    line, before any process starts and before anything is written."""
    for override, words in (("train.epochs=0", ("train.epochs", "positive")),
                             ("threads=0", ("threads=0", "positive integer or null"))):
        assert main(["ddp", "--nproc", "2", "strategies=[naive]", override, f"output_dir={tmp_path / 'o'}"]) == 2
        _one_error_line(capsys, *words)
        assert not (tmp_path / "o").exists()


def test_a_new_run_never_writes_over_another_runs_results(tmp_path, capsys):
    """resume=false into a folder holding another run's results (other settings): one line, the finished
    results untouched; the same run started again may recompute them (the same numbers)."""
    out = tmp_path / "run"
    assert main([*TINY, "strategies=[naive]", f"output_dir={out}"]) == 0
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main([*TINY, "strategies=[naive]", "train.epochs=2", f"output_dir={out}"]) == 2
    _one_error_line(capsys, "another run", "train.epochs")
    assert (out / "results.json").read_bytes() == before
    assert main([*TINY, "strategies=[naive]", f"output_dir={out}"]) == 0  # the same run again
    assert _matrices(out) == {"naive": json.loads(before)["strategies"]["naive"]["accuracy_matrix"]}


def test_the_same_run_stopped_half_way_over_its_finished_results_leaves_them_finished(tiny_run, tmp_path,
                                                                                     monkeypatch):
    """The same run started again without resume into its finished folder, stopped after its first strategy
    (Ctrl-C planted in the second): results.json was rewritten after that strategy ("complete": false, naive
    gone), so the finished run read as unfinished. Now it is kept as it was until the new run ends; then that
    run's results (the same numbers) replace it."""
    from modnet.jobs import cl

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = (out / "results.json").read_bytes()
    real = cl.run_strategy

    def stopped_at_naive(name, *args, **kwargs):
        if name == "naive":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cl, "run_strategy", stopped_at_naive)
    assert main([*TINY, f"output_dir={out}"]) == 130
    assert (out / "results.json").read_bytes() == before
    monkeypatch.setattr(cl, "run_strategy", real)
    assert main([*TINY, f"output_dir={out}"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["complete"] is True and _matrices(out) == _matrices(tiny_run)


@pytest.mark.parametrize("job, results_name", [("gzsl", "results.json"), ("explain", "explanations.json")])
def test_gzsl_and_explain_never_write_over_another_runs_results(tmp_path, capsys, job, results_name):
    """As modnet cl: a folder holding another run's results (its fingerprint: the same job with seed=1) is one
    line and left untouched, and a folder in use (a live process's lock) one line, both before any training
    (gzsl rewrote results.json and left the other run's seed checkpoints beside its own; explain rewrote its
    explanations)."""
    import socket

    from modnet.config import compose
    from modnet.rundir import fingerprint, write_fingerprint

    args = ["train.epochs=1", "progress=false"] + (["methods=[eszsl]"] if job == "gzsl" else [])
    out = tmp_path / "other"
    out.mkdir()
    write_fingerprint(out, fingerprint(compose(job, [*args, "seed=1", f"output_dir={out}"])))
    (out / results_name).write_text('{"of": "the other run"}')
    before = _snapshot(out)
    capsys.readouterr()
    assert main([job, *args, "seed=0", f"output_dir={out}"]) == 2
    _one_error_line(capsys, "another run", "seed (1 -> 0)")
    assert _snapshot(out) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")  # a live process holds it
    assert main([job, *args, f"output_dir={busy}"]) == 2
    _one_error_line(capsys, "in use", str(os.getpid()))
    assert sorted(p.name for p in busy.iterdir()) == [".lock"]


def test_explain_into_the_run_it_explains_is_refused_and_a_failed_explain_leaves_no_fingerprint(tmp_path, capsys):
    """``modnet explain run_dir=R output_dir=R`` wrote its config.yaml and fingerprint over the cl run's: the run
    could then be neither explained (a traceback: its config had no model block) nor resumed. Now one line, R
    untouched, and R is still explained elsewhere. An explain that fails (a run without modnet's checkpoint)
    leaves no fingerprint.json in its new output_dir."""
    run = tmp_path / "run"
    assert main([*TINY, f"output_dir={run}"]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    args = ["explain", f"run_dir={run}", "explain.module_grids=false"]
    assert main([*args, f"output_dir={run}"]) == 2
    _one_error_line(capsys, "is the run_dir")  # was "holds the results of another run" and 137 keys
    assert _snapshot(run) == before
    assert main([*args, f"output_dir={tmp_path / 'explained'}"]) == 0
    assert (tmp_path / "explained" / "explanations.json").is_file()
    # a seed the run does not list: its checkpoint, if any, is another (killed) run's; the record fell back on
    # the listed seed's
    capsys.readouterr()
    assert main([*args, "run_seed=5", f"output_dir={tmp_path / 'seed5'}"]) == 2
    _one_error_line(capsys, "run_seed=5", "[0]")
    naive_only = tmp_path / "naive"
    assert main([*TINY[:1], "strategies=[naive]", *TINY[2:], f"output_dir={naive_only}"]) == 0
    capsys.readouterr()
    # another cl run's folder as explain's output_dir: named as a cl run's (it listed "... and 140 more" differing
    # keys and said to resume that run, which explain cannot)
    before = _snapshot(naive_only)
    assert main([*args, f"output_dir={naive_only}"]) == 2
    _one_error_line(capsys, "holds the results of a `modnet cl` run", "choose another output_dir")
    assert _snapshot(naive_only) == before
    failed = tmp_path / "failed"
    assert main(["explain", f"run_dir={naive_only}", f"output_dir={failed}"]) != 0
    _one_error_line(capsys, "no network of the modnet strategy", "naive")
    assert not (failed / "fingerprint.json").exists()
    # the run's recorded network (results.json) bounds explain.task and explain.layers, before the imports: both
    # were refused once its network had loaded
    for bad, words in (("explain.task=5", ("explain.task=5", "module gates are [0, 1]")),
                       ("explain.layers=[0,7]", ("explain.layers=[0, 7]", "2 masked layers", "0..1"))):
        rejected_before_torch([*args, bad, f"output_dir={failed}"], tmp_path, *words)


def test_a_fresh_start_refuses_a_folder_with_another_runs_checkpoints(tmp_path, capsys):
    """A run killed before any result left its checkpoints; a fresh start with other settings took the folder
    (only results guarded it), kept those files beside its own, and could then not be resumed ("checkpoint ...
    of a different run"). Now one line before anything is written; the same settings may still start again."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "modnet_seed0.pt").write_bytes(b"a killed run's checkpoint")
    from modnet.config import compose
    from modnet.rundir import fingerprint

    killed = fingerprint(compose("cl", [*TINY[1:], "train.epochs=2", f"output_dir={out}"]))
    (out / "fingerprint.json").write_text(json.dumps(killed))
    before = _snapshot(out)
    assert main([*TINY, "train.epochs=3", f"output_dir={out}"]) == 2
    _one_error_line(capsys, "checkpoints of another run", "train.epochs (2 -> 3)")
    assert _snapshot(out) == before


def test_the_fingerprint_holds_the_device_computed_on_and_older_fingerprints_still_match():
    """device=auto was fingerprinted as the word: a CPU run resumed where CUDA is went on on the GPU from CPU
    checkpoints. A fingerprint.json from before the key is taken as made where it is resumed."""
    from modnet.config import compose
    from modnet.rundir import fingerprint, with_added_keys

    cfg = compose("cl", ["device=auto"])
    current = fingerprint(cfg)
    assert current["device.resolved"] == ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    older = {k: v for k, v in current.items() if k != "device.resolved"}
    assert with_added_keys(older, current) == current
    assert with_added_keys({**current, "device.resolved": "cuda"}, current) != current or \
        current["device.resolved"] == "cuda"


def test_the_resume_refusal_shows_what_differs_not_two_cut_values_that_look_alike():
    """A fifth strategy was reported as `strategies (["modnet", "... -> ["modnet", "...)`: both values cut at 12
    characters. Now a list's added and dropped items, and long values from a little before their first difference."""
    from modnet.rundir import describe_difference

    old = {"config.strategies": ["modnet", "naive", "ewc", "lwf"], "config.benchmark.path": "/data/sets/run_a.npz",
           "config.train.epochs": 20}
    new = {"config.strategies": ["modnet", "naive", "ewc", "lwf", "si"],
           "config.benchmark.path": "/data/sets/a_long_folder_name/run_b.npz", "config.train.epochs": 5}
    text = describe_difference(old, new)
    assert "strategies (adds si)" in text
    assert "train.epochs (20 -> 5)" in text
    path = text.split("benchmark.path (", 1)[1]
    assert "run_a.npz" in path and "a_long_folder" in path
    assert "drops ewc" in describe_difference(old, {**old, "config.strategies": ["modnet", "naive", "lwf"]})


def test_ddp_and_cl_keep_each_other_s_finished_runs(tiny_run, tmp_path, capsys):
    """`modnet ddp` wrote its fingerprint and then its results.json over whatever the folder held (it had no
    fresh-start check): a finished cl run of the same or other settings was lost. Now one line before torchrun
    starts, the folder untouched; and cl, fresh or resumed, refuses a ddp run's folder."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = _snapshot(out)
    capsys.readouterr()
    ddp = ["ddp", "--nproc", "2", *TINY[1:]]
    for extra in ([], ["train.epochs=2"]):  # the cl run's own settings, and others
        assert main([*ddp, *extra, f"output_dir={out}"]) == 2
        _one_error_line(capsys, "holds the results of a `modnet cl` run", "choose another output_dir")
        assert _snapshot(out) == before
    ddp_run = tmp_path / "ddp_run"
    ddp_run.mkdir()
    results = json.loads((tiny_run / "results.json").read_text())
    (ddp_run / "results.json").write_text(json.dumps({**results, "world_size": 2, "backend": "gloo"}))
    (ddp_run / "fingerprint.json").write_text((tiny_run / "fingerprint.json").read_text())
    before = _snapshot(ddp_run)
    for extra in (["resume=true"], []):
        assert main([*TINY, *extra, f"output_dir={ddp_run}"]) == 2
        _one_error_line(capsys, "holds the results of a `modnet ddp` run")
        assert _snapshot(ddp_run) == before


@pytest.mark.parametrize("download, fails_with, words", [
    # MNIST's failed download is a RuntimeError over several lines ("Error downloading ..."): it said "not found
    # ... run with benchmark.download=true" to a run that had it
    (True, RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...\n<urlopen error>"),
     ["could not download MNIST", "Error downloading train-images-idx3-ubyte.gz:", "benchmark.download=false"]),
    (False, RuntimeError("Dataset not found. You can use download=True to download it"),
     ["MNIST not found", "Dataset not found", "benchmark.download=true"]),
])
def test_a_torchvision_data_set_that_cannot_be_had_is_named_by_what_failed(monkeypatch, download, fails_with, words):
    import torchvision

    from scenarios.sources import load_torchvision_arrays

    def unavailable(*args, **kwargs):
        raise fails_with

    monkeypatch.setattr(torchvision.datasets, "MNIST", unavailable)
    with pytest.raises((ConnectionError, FileNotFoundError)) as error:
        load_torchvision_arrays("mnist", "data", download)
    assert "\n" not in str(error.value) and all(w in str(error.value) for w in words), str(error.value)


def test_a_failed_fresh_run_that_saved_a_network_keeps_its_fingerprint(tmp_path):
    """modnet gzsl interrupted after its seed-0 network was saved took its fingerprint back, so a run of other
    settings was let into the folder beside that network (and explained under the new run's results)."""
    from modnet.config import ConfigError
    from modnet.rundir import FINGERPRINT_NAME, check_fresh_start, fresh_run

    out = tmp_path / "g"
    with pytest.raises(KeyboardInterrupt):
        with fresh_run(out, {"train.epochs": 5}, "gzsl"):
            (out / "checkpoints").mkdir()
            (out / "checkpoints" / "modnet_seed0_final.pt").write_bytes(b"network")
            raise KeyboardInterrupt
    assert (out / FINGERPRINT_NAME).exists()
    with pytest.raises(ConfigError, match="train.epochs"):
        check_fresh_start(out, {"train.epochs": 3}, "gzsl")
    # one that failed before writing anything leaves the folder as it found it
    empty = tmp_path / "e"
    with pytest.raises(KeyboardInterrupt):
        with fresh_run(empty, {"train.epochs": 5}, "gzsl"):
            raise KeyboardInterrupt
    assert not (empty / FINGERPRINT_NAME).exists()


def test_result_files_are_standard_json_with_nan_as_null():
    """json.dumps writes NaN and Infinity as bare words that JSON.parse, jq and strict parsers refuse (a ResNet's
    CKA of an all-zero layer was NaN in results.json)."""
    from modnet.rundir import results_json

    text = results_json({"cka": [1.0, float("nan")], "std": {"x": float("inf")}, "n": 3, "tuple": (0.5, float("-inf"))})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == \
        {"cka": [1.0, None], "std": {"x": None}, "n": 3, "tuple": [0.5, None]}
