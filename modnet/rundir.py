"""A run's folder is one run's: a lock while a run writes into it, and a fingerprint of what the run is.

* ``RunLock``: ``output_dir/.lock`` made with ``O_CREAT | O_EXCL`` (atomic on every local file system), holding
  the host and pid of the run. A second run into the folder stops at once (``ConfigError`` naming the pid); a
  lock whose process is gone (same host, pid not alive: the run was killed) is stale and taken over.
* ``fingerprint(cfg)``: what decides a run's numbers: the resolved config without the keys that only say
  where and how loudly it runs (``IGNORED_KEYS``), the sha256 of every data file the config names
  (``benchmark.path``), and the versions of torch, Avalanche and modnet. It is written to
  ``output_dir/fingerprint.json`` and into every checkpoint; ``resume=true`` with another fingerprint stops
  with one line listing the keys that differ (``check_resume``), before anything in the folder is written;
  without resume, a folder holding another run's results is not written over (``check_fresh_start``).

Nothing here imports torch but ``fingerprint`` (the device it resolves): the checks run before any training is set up.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from modnet.config import ConfigError

#: top-level config keys that do not change a run's numbers
IGNORED_KEYS = ("output_dir", "progress", "resume", "loggers", "threads")
LOCK_NAME = ".lock"
FINGERPRINT_NAME = "fingerprint.json"


def check_output_dir(out: Path) -> None:
    """``output_dir`` must be a folder (or not exist yet) that this process can write in: a file there, or a
    place where nothing can be created (a read-only or virtual file system: /sys, /proc), is one clear line
    here, before the imports, not a traceback when the run first writes."""
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output_dir={out}: {parent} is a file, not a folder; choose another output_dir")
        if parent.exists():
            break
    else:
        parent = Path.cwd()
    try:  # a probe folder in the nearest existing one: creating is the test (root passes os.access on /proc)
        tempfile.TemporaryDirectory(dir=parent, prefix=".modnet-write-check-").cleanup()
    except OSError as e:
        raise ConfigError(f"output_dir={out}: nothing can be created in {parent} ({e.strerror or e}); choose "
                          "a folder you can write, e.g. output_dir=outputs/run1") from None


def check_run_dir(path) -> Path:
    """``run_dir`` (``modnet explain``) holds a finished run's config.yaml and results.json (one line otherwise;
    ``modnet.validate`` runs it before the imports)."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        what = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise FileNotFoundError(f"run_dir {run_dir} {what}; give the output folder of a finished "
                                "`modnet cl` (or `modnet gzsl`) run of the modnet strategy")
    for name in ("config.yaml", "results.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"run_dir {run_dir} has no {name}: not the output folder of a finished "
                                    "`modnet cl` (or `modnet gzsl`) run")
    return run_dir


def run_network_record(run_dir: Path, run_seed: int | None) -> tuple[int, dict, dict]:
    """(the seed, results.json, its record of that seed's modnet network) of the finished run in
    ``run_dir`` (``check_run_dir``), without torch: ``modnet explain`` reads it, and ``modnet.validate`` checks
    ``explain.task`` / ``explain.layers`` against it before the imports. ``run_seed`` None: the run's first seed.
    The record is ``strategies.modnet.network`` (modnet cl; per seed under ``per_seed``) or a top-level ``network``
    / ``network_per_seed`` (modnet gzsl)."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    if "world_size" in results:  # modnet ddp's results.json (a one-process run's has no such key)
        raise ValueError(f"run_dir {run_dir} is a `modnet ddp` run, which keeps no networks (no checkpoints); "
                         "give a `modnet cl` run of the same settings, or leave run_dir out to train the network here")
    seeds = [int(s) for s in (results.get("seeds") or [results.get("seed", 0)])]
    seed = int(seeds[0] if run_seed is None else run_seed)
    if seed not in seeds:  # a checkpoint of that seed would be another run's (a killed one's)
        raise ValueError(f"run_seed={seed} is not a seed of the run in {run_dir} (its results.json lists "
                         f"{seeds}); choose one of them")
    ran = results.get("strategies")
    if ran is not None and "modnet" not in ran:
        raise ValueError(f"run_dir {run_dir} holds no network of the modnet strategy (its results.json has "
                         f"{', '.join(ran) or 'no strategy'}); give a run of modnet cl with modnet among its "
                         "strategies")
    entry = (ran or {}).get("modnet")
    if entry is None:  # modnet gzsl: one network per seed, the first seed's also at the top level
        entry = {"network": (results.get("network_per_seed") or {}).get(str(seed), results.get("network"))}
        if entry["network"] is None:
            del entry["network"]
    elif "per_seed" in entry:
        entry = entry["per_seed"][seeds.index(seed)]
    if "network" not in entry:
        raise ValueError(f"{Path(run_dir) / 'results.json'} records no network of the modnet strategy "
                         "(strategies.modnet.network or network)")
    return seed, results, entry["network"]


class RunLock:
    """``with RunLock(out):`` holds ``out/.lock`` for the run (see the module docstring)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not self._alive(*owner) or owner is None and self._abandoned():
                    # stale: its run was killed. Taken over one process at a time, and only while it is still
                    # that run's lock: two runs that both read the dead pid both took the folder (the second
                    # deleted the first one's fresh lock)
                    with _exclusive(self.path.with_name(LOCK_NAME + ".takeover")):
                        if self._owner() == owner and (owner is not None or self._abandoned()):
                            self.path.unlink(missing_ok=True)
                    continue
                who = f"pid {owner[1]} on {owner[0]}" if owner else "another run"
                raise ConfigError(f"output_dir={self.path.parent} is in use by {who} (lock file {self.path}); "
                                  "wait for that run to end or choose another output_dir") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise ConfigError(f"could not take the lock {self.path}; remove it if no run uses {self.path.parent}")

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None  # being written, or not ours: treat as held

    def _abandoned(self, seconds: float = 60.0) -> bool:
        """An empty or unreadable lock file older than ``seconds``: its run died between creating and writing it."""
        import time

        try:
            return time.time() - self.path.stat().st_mtime > seconds
        except OSError:
            return False

    @staticmethod
    def _alive(host: str, pid: int) -> bool:
        if host != socket.gethostname():
            return True  # another machine's run: cannot tell, so it holds the folder
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            if self._owner() == (socket.gethostname(), os.getpid()):  # not a lock another run took over
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


@contextmanager
def _exclusive(path: Path):
    """An exclusive advisory lock (``flock``) on ``path`` for the block, released when the process dies; where
    there is no ``fcntl`` (Windows), none."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict:
    from importlib import metadata

    import modnet

    versions = {"modnet": modnet.__version__}
    for name, dist in (("torch", "torch"), ("avalanche", "avalanche-lib")):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(cfg) -> dict:
    """Flat ``{dotted key: value}`` of what decides a run's numbers (module docstring)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED_KEYS:
        config.pop(key, None)
    flat = {f"config.{k}": v for k, v in _flatten(config).items()}
    path = (config.get("benchmark") or {}).get("path")
    if path and Path(path).expanduser().is_file():
        flat["data.benchmark.path.sha256"] = file_sha256(Path(path).expanduser())
    flat.update({f"version.{k}": v for k, v in package_versions().items()})
    if isinstance(config.get("device"), str):
        # the device the run computes on, not the word: device=auto on a CPU run resumed where a GPU is (a
        # shared file system) went on on CUDA from CPU checkpoints, one accuracy matrix mixing both
        from modnet.config import resolve_device  # torch: called by the jobs, after their imports

        flat["device.resolved"] = resolve_device(config["device"]).type
    return json.loads(json.dumps(flat))  # what a JSON round trip gives (tuples -> lists)


#: fingerprint keys newer than some runs' fingerprint.json: a stored fingerprint without one is taken as having
#: the current value (such a run can still be resumed; it was made where it is resumed, as far as it says)
ADDED_KEYS = ("device.resolved",)


def with_added_keys(stored: dict | None, current: dict) -> dict | None:
    if stored is None:
        return None
    return {**{k: current[k] for k in ADDED_KEYS if k in current and k not in stored}, **stored}


def differing_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))


def describe_difference(old: dict, new: dict, limit: int = 6) -> str:
    keys = differing_keys(old, new)
    shown = [f"{k.split('.', 1)[1] if k.startswith('config.') else k} "
             f"({_change(old.get(k, '<absent>'), new.get(k, '<absent>'))})" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _change(old, new, width: int = 24) -> str:
    """What differs between two values, short: the items a list gains and loses, or both values from a little
    before where they first differ (cut to the same start, they looked alike: "["modnet", "... -> ["modnet", "...")."""
    if isinstance(old, list) and isinstance(new, list):
        gained, lost = [v for v in new if v not in old], [v for v in old if v not in new]
        if gained or lost:
            return "; ".join(([f"adds {', '.join(map(_text, gained))}"] if gained else [])
                             + ([f"drops {', '.join(map(_text, lost))}"] if lost else []))
    a, b = _text(old), _text(new)
    if len(a) <= width and len(b) <= width:
        return f"{a} -> {b}"
    same = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
    start = max(0, same - width // 3)
    return f"{_cut(a, start, width)} -> {_cut(b, start, width)}"


def _text(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _cut(text: str, start: int, width: int) -> str:
    return ("..." if start else "") + text[start:start + width] + ("..." if len(text) > start + width else "")


def check_resume(out: Path, current: dict) -> None:
    """``resume=true``: the folder's fingerprint must be ``current``, and its results (if any) a ``modnet cl``
    run's; else one line naming the keys that differ, or the command whose run the folder holds."""
    other = run_command(out)
    if other not in (None, "cl"):
        raise ConfigError(f"resume=true but {out} holds the results of a `modnet {other}` run, which modnet cl "
                          "cannot resume; choose another output_dir")
    stored = with_added_keys(read_fingerprint(out), current)
    if stored is not None and stored != current:
        # resume=false would not start over there either where that run has results (check_fresh_start)
        raise ConfigError(f"resume=true but {out} holds a different run; differing keys: "
                          f"{describe_difference(stored, current)}. Run with the same settings, or choose "
                          "another output_dir, or remove that folder to start over there")


# what a finished run of any command leaves (cl, gzsl: results.json; explain: explanations.json)
RESULT_FILES = ("results.json", "explanations.json")


def _has_results(out: Path) -> bool:
    return any((Path(out) / name).exists() for name in RESULT_FILES)


def check_fresh_start(out: Path, current: dict, command: str = "cl") -> None:
    """``resume=false``: a folder that holds the results of another run (another fingerprint; any command's,
    ``RESULT_FILES``) is not written over, so that no finished result is lost: ``modnet explain
    output_dir=<the run_dir>`` wrote its config.yaml and fingerprint over the cl run's, which could then be neither
    explained nor resumed. The same run started again recomputes the same numbers and may. ``command``: the
    job asking (cl, gzsl, explain); a folder of another command's run is named as such, not by its ~100 config
    keys that differ."""
    if not (_has_results(out) or _has_checkpoints(out)):
        return
    other = run_command(out)
    if other is not None and other != command:  # whatever the settings: `modnet ddp` of a cl run's would replace it
        raise ConfigError(f"{out} holds the results of a `modnet {other}` run; choose another output_dir for "
                          f"modnet {command} (each run writes into a folder of its own)")
    stored = with_added_keys(read_fingerprint(out), current)
    if stored is not None and stored != current:
        # checkpoints too: a killed run's stayed beside the new run's files (cl's resume of the new run then
        # stopped at them; gzsl's seed-0 network of the old run was explained under the new run's results)
        resume = "resume that run with its settings, " if command == "cl" else ""
        raise ConfigError(f"{out} holds the results or checkpoints of another run (differing keys: "
                          f"{describe_difference(stored, current)}); choose another output_dir, {resume}or remove "
                          "that folder to start over there")


def run_command(out: Path) -> str | None:
    """The command whose finished or partial results ``out`` holds (cl, ddp, gzsl, explain), from its result
    files; None where there are none or they are unreadable."""
    if (Path(out) / "explanations.json").exists():
        return "explain"
    try:
        results = json.loads((Path(out) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results_command(results)


def results_command(results) -> str | None:
    """The command that wrote a results.json's content: ``gzsl`` (its methods' U, S, H, already mean +- std over
    its seeds), ``ddp`` or ``cl`` (strategies; ddp's with its world size), None for anything else."""
    if not isinstance(results, dict):
        return None
    if "methods" in results and "calibration" in results and "strategies" not in results:
        return "gzsl"
    if "strategies" in results:
        return "ddp" if "world_size" in results else "cl"
    return None


def holds_finished_results(out: Path) -> bool:
    """Whether ``out/results.json`` is a finished run's (``"complete": true``); unreadable: no."""
    try:
        return json.loads((Path(out) / "results.json").read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _has_checkpoints(out: Path) -> bool:
    folder = Path(out) / "checkpoints"
    return folder.is_dir() and any(p.is_file() for p in folder.iterdir())


@contextmanager
def fresh_run(out: Path, current: dict, command: str):
    """``with fresh_run(out, fingerprint(cfg), command):`` for a job without resume (``modnet gzsl``, ``modnet explain``):
    ``output_dir`` a folder, its lock held for the block, another run's results not written over
    (``check_fresh_start``), this run's fingerprint written (and taken back when the block fails before any
    result or checkpoint is there and the folder had none: a failed run leaves no fingerprint behind; one that
    saved a network keeps it, so that a run of other settings is not let in beside that network)."""
    check_output_dir(out)
    with RunLock(out):
        check_fresh_start(out, current, command)
        had = (Path(out) / FINGERPRINT_NAME).exists()
        write_fingerprint(out, current)
        try:
            yield
        except BaseException:
            if not had and not _has_results(out) and not _has_checkpoints(out):
                (Path(out) / FINGERPRINT_NAME).unlink(missing_ok=True)
            raise


def read_fingerprint(out: Path) -> dict | None:
    path = Path(out) / FINGERPRINT_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path} is unreadable (corrupt); remove it to resume without the check, or choose "
                          "another output_dir") from None


def results_json(obj) -> str:
    """``obj`` as standard JSON for a run's result files: NaN and infinities, which ``json.dumps`` writes as the
    bare words ``NaN`` / ``Infinity`` that other readers (JavaScript's ``JSON.parse``, jq, strict parsers)
    refuse, become null (e.g. the CKA of a layer whose units are all zero, a std over fewer runs than ddof + 1)."""
    import math

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(obj), indent=2, allow_nan=False)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_fingerprint(out: Path, current: dict) -> None:
    write_text_atomic(Path(out) / FINGERPRINT_NAME, json.dumps(current, indent=1, sort_keys=True))
