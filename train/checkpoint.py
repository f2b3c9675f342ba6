"""Checkpoints through orbax's ``CheckpointManager``: async, keep-last-N; the train state and the data position
(the step, and each process's grain iterator state: resuming reads no row twice and skips none, in O(1)).

A checkpoint that cannot be restored (an array file cut short or overwritten, metadata missing, empty or not JSON,
an item directory missing, items that disagree) is *damaged*: one warning line names its step and the file, the
step directory is renamed to ``<step>.damaged`` (kept for inspection; orbax lists only plain step numbers, so it is
never restored, listed or deleted by keep-N again) and the next older checkpoint is tried. With none left, restoring
stops with a ValueError that names the damaged checkpoints and where they went. A checkpoint written for another
model or optimizer, or with another batch size, is not damage: that stops with its own message and moves nothing.

On disk, orbax 0.12.4 writes one directory per step, a Composite of ``state`` (StandardSave), ``data`` (JsonSave)
and ``iterator`` (grain's CheckpointSave)::

    <step>/_CHECKPOINT_METADATA             JSON: the manager's record of the step (item handlers, timestamps)
    <step>/data/metadata                    JSON: the data position: step, rows so far, process count
    <step>/iterator/process_P-of-N.json     JSON: process P's data iterator state (grain's get_state)
    <step>/state/_METADATA                  JSON: the tree (paths, write shapes); use_ocdbt, use_zarr3
    <step>/state/_sharding                  JSON: shardings at save time (restoring to given shardings skips it)
    <step>/state/array_metadatas/process_N  JSON: each process's array write / chunk shapes
    <step>/state/manifest.ocdbt, d/<hash>   the OCDBT database: manifest and b-tree (the zarr .zarray entries)
    <step>/state/ocdbt.process_N/d/<hash>   process N's array chunks (zstd), referenced from the b-tree
    <step>/**/commit_success.txt            informational on file systems with atomic renames (orbax's commit)

The chunks carry no checksum: a file cut short or overwritten fails to decode and is caught, but a few flipped
bits inside a compressed chunk can restore as wrong numbers without any error.

Multi-process runs: every process tries the same step (process 0's newest, broadcast), through the item handlers
rather than the manager, whose restore ends in a barrier that a process whose read failed would never reach; one
allgather then shares each process's outcome, so all agree on damaged / restored / failed, and only process 0
renames directories (then a barrier, and every process reopens its manager: the manager caches its step list).
"""

from __future__ import annotations

import json
import logging
import re
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from twomamba_jax.train.workdir import is_remote
from twomamba_jax.train.workdir import path as workdir_path

_logger = logging.getLogger(__name__)

DAMAGED_SUFFIX = ".damaged"
_ITEMS = ("state", "data", "iterator")  # the Composite's items, as saved by Checkpointer.save
# JSON files (relative to the step directory) that must exist and hold a JSON object; "data/metadata" is the file
# name orbax's JsonCheckpointHandler uses for the `data` item.
_REQUIRED_JSON = ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata")
# JSON files that restoring to given shardings does not need, but that must parse where present.
_OPTIONAL_JSON = ("state/_sharding", "state/array_metadatas/*", "iterator/*.json")
_OUTCOME_BYTES = 1024  # room for one process's outcome in the allgather


class Checkpointer:
    def __init__(self, directory: epath.Path, config):
        if config.every <= 0 or config.keep <= 0:
            raise ValueError(f"checkpoint.every and checkpoint.keep: expected positive ints; got {config.every}, "
                             f"{config.keep}")
        self._directory = workdir_path(directory)
        self._options = ocp.CheckpointManagerOptions(max_to_keep=config.keep,
                                                     enable_async_checkpointing=config.async_save)
        self._manager = self._open()
        self._state_handler = ocp.StandardCheckpointHandler()
        self._data_handler = ocp.JsonCheckpointHandler()
        self._iterator_handler = grain.checkpoint.CheckpointHandler()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self._directory, options=self._options)

    def save(self, step: int, state: dict, batch_size: int, iterator: grain.DatasetIterator) -> None:
        """Saves ``state`` after ``step`` steps of ``batch_size`` rows, with the position of ``iterator`` (this
        process's data iterator, which has given exactly the batches of those steps). Returns once the arrays are
        copied off the devices (the writes may go on in the background)."""
        if step in self._manager.all_steps():
            return
        position = {"step": step, "next_row": step * batch_size, "processes": jax.process_count()}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=ocp.args.JsonSave(position),
                                                         iterator=grain.checkpoint.CheckpointSave(iterator)))

    def restore_latest(self, abstract_state: dict, shardings: dict, batch_size: int,
                       iterator: grain.DatasetIterator) -> dict | None:
        """The newest state that restores, placed with ``shardings``, or None when there is no checkpoint; the
        data ``iterator`` is set to its position.

        Damaged checkpoints on the way are moved aside (see the module docstring); with every one damaged this
        raises a ValueError rather than silently starting over. The saved data position must be where this run's
        batches of ``batch_size`` rows would be at that step, written by as many processes as this run has.
        """
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                              shardings)
        damaged = []  # "STEP (what) -> NEW NAME" of each checkpoint moved aside now
        restored = None
        while restored is None:
            step = self._agreed_latest_step()
            if step is None:
                break
            try:
                (restored, problem), failure = self._attempt(step, target, batch_size, iterator), None
            except Exception as error:  # not damage: a config mismatch, out of memory; every process stops
                restored, problem, failure = None, None, error
            outcomes = _gather_outcomes("F" + _one_line(str(failure)) if failure is not None
                                        else "D" + problem if problem is not None else "")
            if failure is not None:
                raise failure
            for process, outcome in enumerate(outcomes):
                if outcome.startswith("F"):
                    raise RuntimeError(f"checkpoint {step}: process {process} could not restore it: {outcome[1:]}")
            problems = [outcome[1:] for outcome in outcomes if outcome.startswith("D")]
            if problems:
                restored = None
                moved = self._move_aside(step)
                if jax.process_index() == 0:
                    _logger.warning("checkpoint %d is damaged (%s); moved it to %s and trying the checkpoint before "
                                    "it", step, problems[0], moved)
                damaged.append(f"{step} ({problems[0]}) -> {moved.name}")
        if restored is None:
            if damaged:
                raise ValueError(f"no checkpoint in {self._directory} can be restored: every one is damaged and "
                                 f"was moved aside: {'; '.join(damaged)}; to start this run over from step 0, delete "
                                 f"the *{DAMAGED_SUFFIX} directories there or use a new workdir")
            earlier = sorted(path.name for path in self._directory.glob(f"*{DAMAGED_SUFFIX}*"))
            if earlier:  # a rerun after the error above: do not start over on top of them unasked
                raise ValueError(f"no checkpoint in {self._directory} can be restored: the damaged ones were moved "
                                 f"aside earlier ({', '.join(earlier)}); to start this run over from step 0, delete "
                                 "them or use a new workdir")
            return None
        return restored

    def _agreed_latest_step(self) -> int | None:
        """Process 0's newest step, so that every process tries the same one."""
        step = self._manager.latest_step()
        if jax.process_count() > 1:
            step = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step)))
            step = None if step < 0 else step
        return step

    def _attempt(self, step: int, target: dict, batch_size: int,
                 iterator: grain.DatasetIterator) -> tuple[dict | None, str | None]:
        """(state, None) of ``step`` (``iterator`` set to its data position), or (None, what is damaged in it).
        Raises ValueError when the checkpoint is intact but holds another model or optimizer than ``target``, or
        was written with another batch size or process count."""
        path = self._directory / str(step)  # the manager's default step directory name
        problem = _check_files(path)
        if problem:
            return None, problem
        try:  # reads _METADATA and the arrays' zarr metadata in the OCDBT b-tree
            metadata = self._state_handler.metadata(path / "state")
        except Exception as error:  # noqa: BLE001 - any failure to read it is damage
            return None, _describe(error, path, "state")
        mismatch = _shape_mismatch(metadata, target)
        if mismatch:
            raise ValueError(f"checkpoint {step} holds another model or optimizer than this config ({mismatch}); "
                             "resume with the config it was written with (config.json in the workdir) or use a new "
                             "workdir")
        readers = {
            "data": lambda: self._data_handler.restore(path / "data", args=ocp.args.JsonRestore()),
            "state": lambda: self._state_handler.restore(path / "state", args=ocp.args.StandardRestore(target)),
            "iterator": lambda: self._iterator_handler.restore(path / "iterator",
                                                               args=grain.checkpoint.CheckpointRestore(iterator)),
        }
        restored = {}
        for item, read in readers.items():
            try:
                restored[item] = read()
            except Exception as error:  # noqa: BLE001 - what is not a lack of memory is damage
                if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
                    raise
                return None, _describe(error, path, item)
            if item == "data":
                position = restored["data"]
                if not (isinstance(position, dict) and position.get("step") == step
                        and isinstance(position.get("next_row"), int)):
                    return None, (f"data/metadata holds {_one_line(repr(position))[:100]}, not the data position of "
                                  f"step {step}")
                _check_position(position, batch_size)
        # orbax gives containers back as plain tuples / dicts: put the leaves back into the optimizer's types.
        state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored["state"]))
        saved_step = int(jax.device_get(state["step"]))
        if saved_step != step:
            return None, f"state holds step {saved_step}"
        return state, None

    def _move_aside(self, step: int) -> epath.Path:
        """Renames ``<step>`` to ``<step>.damaged`` (``.damaged-2``, ... if taken) on process 0 and reopens the
        manager on every process, so that it neither lists nor keep-N-deletes the step."""
        number = 1
        if jax.process_index() == 0:
            while (self._directory / _damaged_name(step, number)).exists():
                number += 1
            _move(self._directory / str(step), self._directory / _damaged_name(step, number))
        if jax.process_count() > 1:
            number = int(multihost_utils.broadcast_one_to_all(np.int32(number)))
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self._manager.close()
        self._manager = self._open()
        return self._directory / _damaged_name(step, number)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        self._state_handler.close()
        self._data_handler.close()
        self._iterator_handler.close()


def _move(source: epath.Path, destination: epath.Path) -> None:
    """Renames a directory; on an object store, where a directory is only a prefix of object names, copies each
    file and then deletes the originals."""
    if not is_remote(source):
        source.rename(destination)
        return
    for directory, _, files in source.walk():
        for name in files:
            target = destination / (directory / name).relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            (directory / name).copy(target)
    source.rmtree()


def _check_position(position: dict, batch_size: int) -> None:
    """Refuses a data position this run cannot continue from: another batch size or process count."""
    step = position["step"]
    if "processes" not in position:
        raise ValueError(f"the checkpoint at step {step} predates the saved data iterator state (it holds only the "
                         "step); resume it with the version that wrote it or use a new workdir")
    if position["next_row"] != step * batch_size:
        raise ValueError(f"data.batch_size: the checkpoint at step {step} was written with "
                         f"{position['next_row'] // max(step, 1)} rows per step; resuming with {batch_size} would "
                         "skip or repeat data (use a new workdir to change it)")
    if position["processes"] != jax.process_count():
        raise ValueError(f"the checkpoint at step {step} was written by {position['processes']} process(es), each "
                         f"with its own data position; resume it with {position['processes']} (this run has "
                         f"{jax.process_count()}) or use a new workdir")


def _damaged_name(step: int, number: int) -> str:
    return f"{step}{DAMAGED_SUFFIX}" + (f"-{number}" if number > 1 else "")


def _gather_outcomes(outcome: str) -> list[str]:
    """Every process's outcome of one restore attempt, in process order: '' restored, 'D...' damaged (what),
    'F...' failed for another reason."""
    if jax.process_count() == 1:
        return [outcome]
    raw = outcome.encode()[:_OUTCOME_BYTES]
    row = np.zeros(_OUTCOME_BYTES, np.uint8)
    row[:len(raw)] = np.frombuffer(raw, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), _OUTCOME_BYTES)
    return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in rows]


def _check_files(path: epath.Path) -> str | None:
    """What is missing or unreadable among the items and metadata files of a step directory (cheap, and names
    the file where orbax's own errors would not), or None."""
    for item in _ITEMS:
        if not (path / item).is_dir():
            return f"the {item} item ({item}/) is missing"
    optional = [file for pattern in _OPTIONAL_JSON for file in sorted(path.glob(pattern))]
    for file in [path / name for name in _REQUIRED_JSON] + optional:
        name = file.relative_to(path).as_posix()
        if not file.is_file():
            return f"{name} is missing"
        content = file.read_bytes()
        if not content.strip():
            return f"{name} is empty"
        try:
            value = json.loads(content)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            return f"{name} is not valid JSON"
        if not isinstance(value, dict):
            return f"{name} is not a JSON object"
    if json.loads((path / "state/_METADATA").read_bytes()).get("use_ocdbt"):
        manifest = path / "state/manifest.ocdbt"
        if not manifest.is_file():
            return "state/manifest.ocdbt is missing"  # tensorstore would only say the arrays do not exist
        if manifest.stat().length == 0:
            return "state/manifest.ocdbt is empty"
    return None


def _path_key(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shape_mismatch(metadata, target: dict) -> str | None:
    """The first array whose presence or shape differs between the saved tree and this run's, or None."""
    saved = {_path_key(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]
             if getattr(leaf, "shape", None) is not None}
    wanted = {_path_key(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    for key in sorted(saved.keys() | wanted.keys()):
        if key not in saved:
            return f"{key}: not in the checkpoint"
        if key not in wanted:
            return f"{key}: in the checkpoint, not in this config"
        if saved[key] != wanted[key]:
            return f"{key}: shape {saved[key]} in the checkpoint, {wanted[key]} in this config"
    return None


def _chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _short(error: BaseException) -> str:
    """The innermost cause in a few words: tensorstore's status code and last clause, or the exception type and
    the first line of its message."""
    inner = _chain(error)[-1]
    text = str(inner).split(" [tensorstore_spec")[0].strip()
    text = text.splitlines()[0] if text else ""
    code, _, rest = text.partition(": ")
    if rest and re.fullmatch(r"[A-Z_]+", code):
        # "CODE: Error opening ...: Error reading "key" in ... at local file "/path": what went wrong"
        what = rest.rsplit('": ', 1)[-1]
        text = f"{code}: {what}"
    else:
        text = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    return _one_line(text)[:200]


def _describe(error: BaseException, path: epath.Path, item: str) -> str:
    """The damaged file (relative to the step directory ``path``) and the cause, from a failed restore of
    ``item``: a file named in the error, else the data file holding the array chunk that failed to read (from
    the OCDBT b-tree), else the item."""
    texts = [str(e) for e in _chain(error)]
    files = [match.rstrip(".:,;") for text in texts
             for match in re.findall(re.escape(str(path)) + r"/[^\s\"'\\]*", text)]
    files = [file for file in files if not file.endswith("/")]
    if files:
        return f"{_relative(epath.Path(files[-1]), path)}: {_short(error)}"
    for text in texts:
        match = re.search(r'Error reading "([^"]+)" in OCDBT database at local file "([^"]+)"', text)
        if match:
            key, database = match.groups()
            file = _ocdbt_value_file(epath.Path(database), key)
            return f"{_relative(file or epath.Path(database), path)} (array {key.split('/')[0]}): {_short(error)}"
    return f"the {item} item ({item}/): {_short(error)}"


def _relative(file: epath.Path, path: epath.Path) -> str:
    return file.relative_to(path).as_posix() if file.is_relative_to(path) else str(file)


def _ocdbt_value_file(database: epath.Path, key: str) -> epath.Path | None:
    """The file that holds ``key``'s value in the OCDBT database at ``database``, by walking its b-tree (keys in
    a node are relative to the common prefixes of the nodes above it); None when that cannot be read."""
    try:
        import tensorstore as ts

        base = ts.KvStore.open(f"{database}/" if is_remote(database) else f"file://{database}/").result()
        location = ts.ocdbt.dump(base).result()["versions"][-1]["root"].get("location")
        prefix, wanted = b"", key.encode()
        while location:
            node = ts.ocdbt.dump(base, location).result()
            if node["height"] == 0:
                value = next((e.get("indirect_value") for e in node["entries"] if prefix + e["key"] == wanted), None)
                if not value:
                    return None
                # "value:<sub-database>:<file>:<offset>:<length>", e.g. value:ocdbt.process_0/:d/<hash>:0:15249
                subdir, _, file = value[len("value:"):].rsplit(":", 2)[0].partition(":")
                return database / subdir / file
            children = [e for e in node["entries"] if prefix + e["key"] <= wanted]
            if not children:
                return None
            prefix += children[-1].get("subtree_common_prefix", b"")
            location = children[-1]["location"]
    except Exception:  # noqa: BLE001 - only a better name for the damage; the caller falls back to the database
        return None
    return None
