"""Where and how a calibrated exit policy is cached: one JSON file per key in the user's cache folder.

A key says what a policy was computed for: the model, the device and machine (calibration by time
measures costs, so the policy is only valid where it was measured), the dtype, the library versions
and the calibration's inputs (candidate exit layers, target agreement, ...). The file name is a hash
of the key and the file holds the key again, so a policy is reused only for an equal key.

The folder is ``$EARLYEXIT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/earlyexit``, else
``~/.cache/earlyexit``. Files are written atomically (a temporary file in the same folder, then
``os.replace``); an unreadable file is ignored with a one-line warning and recomputed.
"""

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time

import torch

CACHE_ENV = "EARLYEXIT_CACHE_DIR"
FORMAT = 1
_PREFIX = "policy-"


def cache_dir():
    """The cache folder: ``$EARLYEXIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/earlyexit``, else ``~/.cache/earlyexit``.

    Empty variables count as unset. The folder is not created here.
    """
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "earlyexit")


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_identity(device):
    """What timings depend on besides the model: {device type, device name, host, CPU threads}."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model()
    return dict(device_type=device.type, device_name=name, host=platform.node(), cpu_threads=torch.get_num_threads())


def model_identity(model, file=None):
    """{file, bytes, config[, files]}: where the model was loaded from and a hash of the model's config.

    file: None, the weights file (a .gguf: its path and size) or a model folder (its path, the total size
    of its files and ``files``: every file in it, sub-folders included, as ``{relative path: [bytes,
    mtime_ns]}``; config, weights and tokenizer, so re-saving or changing any of them is another key).
    """
    config = getattr(model, "config", None)
    text = json.dumps(config.to_dict() if config is not None else None, sort_keys=True, default=str)
    ident = dict(file=None, bytes=None, config=hashlib.sha256(text.encode()).hexdigest()[:16])
    if file is not None and os.path.isdir(file):
        files = _folder_files(file)
        ident.update(file=os.path.abspath(file), bytes=sum(size for size, _ in files.values()), files=files)
    elif file is not None:
        ident.update(file=os.path.abspath(file), bytes=os.path.getsize(file))
    return ident


def _folder_files(folder):
    """{relative path: [bytes, mtime_ns]} of the files under ``folder`` (hidden ones and links to folders skipped)."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            st = os.stat(path)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = [st.st_size, st.st_mtime_ns]
    return files


def policy_key(model, device, dtype, **calibration):
    """The cache key (a JSON-ready dict) of a policy calibrated for ``model`` on ``device`` in ``dtype``.

    model: :func:`model_identity` (or any JSON-ready identity); calibration: the calibration's inputs
    (e.g. exit_layers, target_agreement, measure, objective, corpus). Versions of torch, transformers
    and earlyexit and :func:`machine_identity` are added.
    """
    from earlyexit import __version__

    key = dict(
        format=FORMAT,
        model=model,
        machine=machine_identity(device),
        dtype=str(dtype).replace("torch.", ""),
        versions=dict(torch=torch.__version__, transformers=_version("transformers"), earlyexit=__version__),
        calibration=calibration,
    )
    return _canonical(key)


def _canonical(key):
    """The key as it reads back from JSON (tuples become lists, ...): what a loaded key is compared to."""
    return json.loads(json.dumps(key, sort_keys=True))


def policy_file(key, folder=None):
    """The path of ``key``'s file in ``folder`` (default :func:`cache_dir`)."""
    digest = hashlib.sha256(json.dumps(_canonical(key), sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(folder or cache_dir(), f"{_PREFIX}{digest}.json")


def load_policy(key, folder=None, warn=None):
    """The policy cached for ``key`` (a dict), or None: no file, a file for another key, or an unreadable file.

    An unreadable file (not JSON, not a cache record) is ignored with a one-line warning on ``warn``
    (default stderr); it is replaced when the policy is saved again.
    """
    path = policy_file(key, folder)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        _warn(warn, path, f"{type(e).__name__}: {e}")
        return None
    if not isinstance(record, dict) or not isinstance(record.get("policy"), dict) or "key" not in record:
        _warn(warn, path, "not a cached policy record")
        return None
    if record["key"] != _canonical(key):
        return None
    return record["policy"]


def _warn(warn, path, why):
    why = " ".join(str(why).split())  # one line
    (warn or sys.stderr).write(f"earlyexit: ignoring the unreadable policy cache {path} ({why})\n")


def save_policy(key, policy, folder=None):
    """Write ``policy`` (a JSON-ready dict) for ``key`` atomically; returns the file's path.

    The record is written to a temporary file in the same folder and moved over the old file with
    ``os.replace``: a reader sees the old file or the new one, never a part; on an error the old file
    stays and the temporary file is removed.
    """
    path = policy_file(key, folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = dict(key=_canonical(key), policy=policy, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def policy_record(eem, report, seconds=None):
    """The policy ``earlyexit.calibrate`` set on ``eem`` as a JSON-ready dict (also the contents of
    ``earlyexit calibrate``'s thresholds.json): exit layers, measure, thresholds, what they achieved,
    ``report`` (the report's one-line summary) and ``calibration_seconds`` (None when not timed).
    """
    return dict(
        exit_layers=list(eem.exit_layers),
        measure=eem.measure,
        thresholds=[float(t) for t in report.thresholds],
        calibration_agreement=report.agreement,
        calibration_mean_layers=report.mean_layers,
        target_agreement=report.target_agreement,
        tokens=report.tokens,
        objective=report.objective,
        dropped_layers=list(report.dropped_layers),
        expected_time_per_token_s=report.time_per_token_s,
        full_depth_time_per_token_s=report.full_depth_time_s,
        report=str(report),
        calibration_seconds=seconds,
    )
