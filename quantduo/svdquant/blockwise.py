"""Block-by-block SVDQuant: peak accelerator memory is one block plus one calibration call, and a killed run resumes.

The model's blocks (e.g. a diffusion transformer's ``transformer_blocks.0`` ... ``single_transformer_blocks.37``)
must form a *chain*: each block's tensor inputs are outputs of the previous block or inputs the previous block
received too (timestep embedding, RoPE tables). :func:`chain_plan` checks that on one probe call and records how each
block's call is assembled. Then, block by block: the block moves to the device, is calibrated on its captured
inputs and quantized by :func:`quantize_model`, its quantized state is written to ``work_dir``, and its outputs
(full-precision, or the quantized block's with ``sequential=True``, the paper's sequential setting) become the next
block's inputs. Linears outside the blocks are not touched.

Kill safety: a finished block's state is written atomically (:func:`write_checkpoint`: weights, then the JSON that
marks it finished), from a background thread while the next block is calibrated. ``resume=True`` reloads the
finished blocks, recomputes the activations flowing through them (same operations on the same data: the same bytes)
and goes on from the first unfinished block, so the result is byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..utils import atomic_write
from .config import SVDQuantConfig
from .phases import phase, phase_summary
from .quantize import LayerReport, QuantizationReport, quantize_model
from .serialization import CONFIG_NAME, checkpoint_state, load_quantized, write_checkpoint

Call = tuple[tuple, dict]  # (args, kwargs) of one module call
MANIFEST = "blockwise.json"


class _Stop(Exception):
    """Raised by a pre-hook to end a forward once the hooked block's inputs are captured."""


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` (nested tuples / lists / dicts) with ``fn`` applied to every tensor."""
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, obj)


@dataclass
class Feed:
    """How one block's call is assembled from the previous block's call and output.

    sources: one per leaf of the call's pytree: ``("out", k)`` the previous output's leaf ``k``, ``("in", k)`` the
    previous call's leaf ``k``, ``("const", value)`` a non-tensor value.
    """

    spec: pytree.TreeSpec
    sources: list[tuple[str, Any]]

    def call(self, previous: Call, output: Any) -> Call:
        """The call of this block, float tensors as the previous block produced / received them."""
        prev_in, prev_out = pytree.tree_leaves(previous), pytree.tree_leaves(output)
        leaves = [prev_out[v] if kind == "out" else prev_in[v] if kind == "in" else v for kind, v in self.sources]
        return pytree.tree_unflatten(leaves, self.spec)


class _ChainProbe:
    """Hooks on every block: at each block's call, derive its :class:`Feed` from the previous block's call and
    output, then forget them (one block's activations alive at a time)."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        self.names = {id(block): name for name, block in blocks}
        self.feeds: dict[str, Feed] = {}
        self.order: list[str] = []
        self._previous: tuple[str, list, list] | None = None  # name, call leaves, output leaves
        self._call: list = []

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = self.names[id(module)]
        if name in self.order:
            raise ValueError(f"blockwise calibration: block {name!r} is called more than once per model call")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if self._previous is not None:
            prev, prev_in, prev_out = self._previous
            self.feeds[name] = Feed(spec, [_source(leaf, prev_in, prev_out, name, prev) for leaf in leaves])
        self.order.append(name)
        self._call = leaves

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._previous = (self.names[id(module)], self._call, pytree.tree_leaves(output))


def chain_plan(model: nn.Module, blocks: list[tuple[str, nn.Module]], call: Call, device: torch.device,
               home: torch.device, weights: LazyWeights | None = None) -> list[Feed]:
    """Run ``model(*call)`` once (each block moved from ``home`` to ``device``, or read there from ``weights``, only
    while it runs; the rest of the model must be on ``device``) and derive the :class:`Feed` of every block after
    the first.

    Raises:
        ValueError: the blocks are not called once each in the order given, or a block's tensor input is computed
            between blocks (not an output or input of the previous block), naming the block.
    """
    probe, handles = _ChainProbe(blocks), _offload_hooks(blocks, device, home, weights)
    for _, block in blocks:
        handles += [block.register_forward_pre_hook(probe.pre, with_kwargs=True),
                    block.register_forward_hook(probe.post, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(*call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    expected = [name for name, _ in blocks]
    if probe.order != expected:
        missing = [n for n in expected if n not in probe.order]
        raise ValueError(f"blockwise calibration: block {missing[0] if missing else expected[0]!r} is not called "
                         f"once in the given order (called: {probe.order[:4]}...)")
    return [probe.feeds[name] for name in expected[1:]]


def _source(leaf: Any, prev_in: list, prev_out: list, name: str, prev: str) -> tuple[str, Any]:
    if not isinstance(leaf, torch.Tensor):
        return ("const", leaf)
    for kind, pool in (("out", prev_out), ("in", prev_in)):
        for k, candidate in enumerate(pool):
            if candidate is leaf:
                return (kind, k)
    raise ValueError(f"blockwise calibration: an input of block {name!r} (shape {tuple(leaf.shape)}) is computed "
                     f"between {prev!r} and {name!r}, not passed on from it; the blocks do not form a chain")


def first_block_calls(model: nn.Module, block: nn.Module, samples: Sequence[Call], device: torch.device,
                      store: CallStore) -> CallStore:
    """Append to ``store`` the call ``block`` receives in ``model(*sample)`` for every sample (``block`` and the later
    blocks never run)."""

    def stop(module, args, kwargs):
        store.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for args, kwargs in samples:
            args, kwargs = map_tensors((args, kwargs), lambda t: t.to(device))
            try:
                with torch.no_grad():
                    model(*args, **kwargs)
            except _Stop:
                continue
            raise ValueError("blockwise calibration: the model call never reached its first block")
    finally:
        handle.remove()
    return store


class LazyWeights:
    """A model's full-precision tensors read on demand from its safetensors files, straight onto the device that
    needs them, so that a model built on the meta device is materialized one block at a time: host memory holds one
    block instead of the model.

    files: the model's ``*.safetensors`` (keys: the model's state-dict names); dtype: floating-point tensors are
    cast to it (None: as stored).
    """

    def __init__(self, files: Sequence[str | Path], dtype: torch.dtype | None = None):
        self.dtype = dtype
        self._file_of: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(file), "pt") as f:
                    self._file_of.update(dict.fromkeys(f.keys(), Path(file)))
            except (OSError, SafetensorError) as err:
                raise ValueError(f"cannot read {file} as safetensors: {err}") from err
        if not self._file_of:
            raise ValueError(f"no tensors in {[str(f) for f in files]}")

    def load(self, module: nn.Module, prefix: str, device: torch.device | str, exclude: Sequence[str] = ()) -> None:
        """Give ``module`` (the model's submodule named ``prefix``, ``""`` for the model) its stored tensors on
        ``device`` (assigned: meta tensors become real), except those under the submodules ``exclude``; its other
        buffers (computed, not stored) move to ``device`` too. ValueError naming a tensor the files lack."""
        by_file: dict[Path, dict[str, str]] = {}  # file -> {stored name: name in module}
        for key in module.state_dict():
            if any(key == e or key.startswith(f"{e}.") for e in exclude):
                continue
            full = f"{prefix}.{key}" if prefix else key
            if full not in self._file_of:
                raise ValueError(f"tensor {full!r} is not in the model's safetensors files")
            by_file.setdefault(self._file_of[full], {})[full] = key
        state = {}
        own = torch.device(device).type == "cpu"  # CPU tensors of safe_open map the file: copy, so it is unmapped
        for file, names in by_file.items():
            with safe_open(str(file), "pt", device=str(device)) as f:
                for full, key in names.items():
                    tensor = f.get_tensor(full)
                    dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
                    state[key] = tensor.to(dtype, copy=own)
        module.load_state_dict(state, strict=False, assign=True)
        _move_outside_blocks(module, list(exclude), torch.device(device))


def _move_outside_blocks(model: nn.Module, block_names: list[str], device: torch.device) -> None:
    """Move the parameters and buffers of ``model`` that lie outside every block to ``device`` (``meta``: free
    them)."""
    for name, module in model.named_modules():
        if any(name == b or name.startswith(f"{b}.") for b in block_names):
            continue
        for key, param in module.named_parameters(recurse=False):
            if (param.device.type == "meta") == (device.type == "meta"):
                param.data = param.data.to(device)
            else:  # a tensor cannot change between meta and real storage in place
                module._parameters[key] = nn.Parameter(param.data.to(device), param.requires_grad)
        for key, buf in module.named_buffers(recurse=False):
            module._buffers[key] = buf.to(device)


def _bring(block: nn.Module, name: str, device: torch.device, weights: LazyWeights | None) -> None:
    """Put ``block`` on ``device``: moved there, or (``weights``) read there from the files."""
    if weights is None:
        block.to(device)
    else:
        weights.load(block, name, device)


def _bring_outside(model: nn.Module, block_names: list[str], device: torch.device,
                   weights: LazyWeights | None) -> None:
    """Put the parts of ``model`` outside the blocks on ``device``: moved there, or (``weights``) read there."""
    if weights is None:
        _move_outside_blocks(model, block_names, device)
    else:
        weights.load(model, "", device, exclude=block_names)


def _offload_hooks(blocks: list[tuple[str, nn.Module]], device: torch.device, home: torch.device,
                   weights: LazyWeights | None = None) -> list:
    """Hooks putting each block on ``device`` just before it runs (:func:`_bring`) and sending it to ``home`` right
    after (with ``weights``: to the meta device, i.e. freed)."""
    handles = []
    after = torch.device("meta") if weights is not None else home
    for name, block in blocks:
        handles += [block.register_forward_pre_hook(lambda m, a, name=name: _bring(m, name, device, weights)),
                    block.register_forward_hook(lambda m, a, o: m.to(after) and None)]
    return handles


@contextmanager
def blocks_offloaded(model: nn.Module, block_names: list[str], device: torch.device | str,
                     weights: LazyWeights | None = None) -> Iterator[None]:
    """Run ``model`` on ``device`` holding one block there at a time: inside the ``with``, everything outside the
    blocks is on ``device`` and each block moves there just before it runs and back to where it was (the blocks'
    home, e.g. the CPU) right after. Afterwards the parts outside the blocks are back home too. GPU memory: the
    model minus its blocks, plus one block.

    weights: the model is a meta-device skeleton whose tensors are read from these files: the parts outside the
    blocks for the ``with`` (on the meta device again afterwards), each block for its run (host memory: one block).
    """
    device = torch.device(device)
    blocks = [(name, model.get_submodule(name)) for name in block_names]
    home = torch.device("meta") if weights is not None else next(blocks[0][1].parameters()).device
    _bring_outside(model, block_names, device, weights)
    handles = _offload_hooks(blocks, device, home, weights)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _move_outside_blocks(model, block_names, home)


class CallStore:
    """Calibration calls of one block: in memory on ``device`` (host memory, or the accelerator when they fit), or
    (``spill_dir``) one file per call on disk. Appended tensors are copied (detached from the caller's)."""

    def __init__(self, spill_dir: Path | None = None, device: torch.device = torch.device("cpu")):
        self.spill_dir, self.device, self.size, self.nbytes = spill_dir, device, 0, 0
        self._calls: list[Call] = []
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)
            spill_dir.mkdir(parents=True)

    def append(self, call: Call) -> None:
        call = map_tensors(call, lambda t: t.detach().to("cpu" if self.spill_dir else self.device, copy=True))
        self.nbytes += sum(t.numel() * t.element_size() for t in pytree.tree_leaves(call) if torch.is_tensor(t))
        if self.spill_dir is None:
            self._calls.append(call)
        else:
            torch.save(call, self.spill_dir / f"{self.size}.pt")
        self.size += 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Call:
        if self.spill_dir is None:
            return self._calls[i]
        return torch.load(self.spill_dir / f"{i}.pt", weights_only=False)

    def moved_to(self, device: torch.device) -> "CallStore":
        """The same calls held in memory on ``device`` (self if they already are there, or are on disk)."""
        if self.spill_dir is not None or self.device == device:
            return self
        moved = CallStore(device=device)
        for i in range(len(self)):
            moved.append(self[i])
        return moved


# accelerator memory kept free for the per-layer solve (the batched smoothing search, 2 GiB batches by default, and the
# SVD of the largest group) when deciding whether the calibration activations can stay on the accelerator
SOLVER_BYTES = 3 << 30
ACTIVATIONS = ("auto", "device", "host", "disk")


def activations_fit(store_bytes: int, block: nn.Module, device: torch.device) -> bool:
    """Whether a block's calibration calls and the next block's (``store_bytes`` each), two copies of ``block`` (the
    block and its quantized layers being built) and :data:`SOLVER_BYTES` fit in 90 % of the accelerator memory this
    process may still use (the free memory, within ``torch.cuda.set_per_process_memory_fraction``'s cap). Always
    False off CUDA."""
    if device.type != "cuda":
        return False
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    free, total = torch.cuda.mem_get_info(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    allowed = min(free, fraction * total - torch.cuda.memory_reserved(device))
    block_bytes = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
    return 2 * store_bytes + 2 * block_bytes + SOLVER_BYTES <= 0.9 * allowed


def _store_device(activations: str, store: CallStore, block: nn.Module, device: torch.device) -> torch.device:
    """Where the in-memory calibration calls live for ``activations`` (``auto``: the accelerator if they fit)."""
    if activations == "device" or (activations == "auto" and activations_fit(store.nbytes, block, device)):
        return device
    return torch.device("cpu")


def _forward_all(block: nn.Module, store: CallStore, device: torch.device, feed: Feed | None,
                 next_store: CallStore | None) -> None:
    """``block`` over every stored call (on ``device``); with ``feed``, the next block's calls go to ``next_store``."""
    with torch.no_grad():
        for i in range(len(store)):
            call = store[i]
            args, kwargs = map_tensors(call, lambda t: t.to(device))
            output = block(*args, **kwargs)
            if feed is not None:
                next_store.append(feed.call(call, output))


def _check_work_dir(work_dir: Path, manifest: dict, resume: bool) -> None:
    path = work_dir / MANIFEST
    if path.is_file():
        if not resume:
            raise ValueError(f"{work_dir} holds a blockwise run already: resume it or choose an empty work dir")
        if json.loads(path.read_text()) != manifest:
            raise ValueError(f"{work_dir} was made with other settings (config, blocks, samples or mode) than this run")
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def _quantize_block(block: nn.Module, name: str, calib_fn: Callable[[nn.Module], None],
                    config: SVDQuantConfig) -> list[LayerReport]:
    """Calibrate block ``name`` by ``calib_fn`` and quantize it; its layers' reports, named within the model."""
    report = quantize_model(block, calib_fn, config, progress=False)
    return [LayerReport(**{**asdict(r), "name": f"{name}.{r.name}", "group": [f"{name}.{g}" for g in r.group]})
            for r in report.layers]


class _BlockWriter:
    """Writes finished blocks from one background thread, in block order, so that a block's file write (safetensors,
    SHA-256, fsync) overlaps the next block's calibration. A block is snapshotted to host memory before it is handed
    over; :meth:`submit` first waits for the previous write and re-raises its error. The ``with`` exit waits for the
    write in flight, also on an exception or Ctrl-C, so no block folder is left half-written (they are atomic
    anyway) and a finished block is never reported before it is on disk. The ``save`` phase counts the time the
    quantizer waits: the snapshot and any write the next block did not hide."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantduo-block-writer")
        self._pending: Future | None = None

    def submit(self, block: nn.Module, block_dir: Path, config: SVDQuantConfig, layers: list[LayerReport]) -> None:
        with phase("save"):
            snapshot = checkpoint_state(block)
            self._wait()
            self._pending = self._pool.submit(write_checkpoint, block_dir, *snapshot, config,
                                              {"report": [asdict(r) for r in layers]})

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "_BlockWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            with phase("save"):
                self._wait()
        except Exception:
            if exc_type is None:  # else the run's own error (or Ctrl-C) is the one to report
                raise
        finally:
            self._pool.shutdown(wait=True)


def quantize_blockwise(
    model: nn.Module,
    block_names: list[str],
    samples: Sequence[Call],
    config: SVDQuantConfig,
    work_dir: str | Path,
    *,
    resume: bool = False,
    sequential: bool = False,
    activations: str = "auto",
    device: torch.device | str | None = None,
    progress: bool = True,
    weights: LazyWeights | None = None,
) -> QuantizationReport:
    """SVDQuant the blocks ``block_names`` of ``model`` (in place), one at a time.

    Args:
        block_names: module names of the blocks in call order; they must form a chain (:func:`chain_plan`).
        samples: calibration calls ``(args, kwargs)`` of ``model`` (tensors anywhere; moved to ``device`` per call).
        config: the :class:`SVDQuantConfig` of every block (its names are matched against names inside a block).
        work_dir: where finished blocks (and spilled activations) go.
        resume: continue the run recorded in ``work_dir`` (else ``work_dir`` must hold no run).
        sequential: calibrate each block on the outputs of the already-quantized blocks (else full precision).
        activations: where the calibration activations live between blocks: ``device`` (no transfers; the block's
            calls and the next block's on the accelerator at once), ``host`` (host memory, moved per call),
            ``disk`` (one call in host memory at a time), ``auto`` (``device`` if :func:`activations_fit`, else
            ``host``).
        device: where each block runs (default: where ``model``'s first parameter is); blocks go back after.
        weights: ``model`` is a meta-device skeleton (:class:`LazyWeights`): each block is read from these files
            onto ``device`` when its turn comes, the parts outside the blocks at the start; everything ends on the
            CPU (host memory: the quantized blocks, one full-precision block and the calibration data).
    Returns:
        The per-layer :class:`QuantizationReport` (layer names prefixed with their block's name).
    """
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    work_dir = Path(work_dir)
    home = torch.device("cpu") if weights is not None else next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    manifest = dict(config=config.to_dict(), blocks=block_names, samples=len(samples), sequential=sequential)
    _check_work_dir(work_dir, manifest, resume)
    blocks = [(name, model.get_submodule(name)) for name in block_names]
    spill_dir = (lambda i: work_dir / "activations" / str(i % 2)) if activations == "disk" else (lambda i: None)
    _bring_outside(model, block_names, device, weights)
    with phase("capture"):
        probe = map_tensors(samples[0], lambda t: t.to(device))
        feeds = chain_plan(model, blocks, probe, device, home, weights) + [None]
        store = first_block_calls(model, blocks[0][1], samples, device, CallStore(spill_dir(0)))
        store_device = _store_device(activations, store, blocks[0][1], device)
        store = store.moved_to(store_device)
    _move_outside_blocks(model, block_names, home)
    reports: list[LayerReport] = []
    bar = tqdm(blocks, desc="blockwise SVDQuant", unit="block", disable=not progress)
    with _BlockWriter() as writer:
        for i, (name, block) in enumerate(bar):
            bar.set_postfix_str(f"{name}; so far {phase_summary()}")
            _bring(block, name, device, weights)
            feed = feeds[i]
            next_store = CallStore(spill_dir(i + 1), store_device) if feed is not None else None
            block_dir = work_dir / "blocks" / f"{i:04d}"
            finished = (block_dir / CONFIG_NAME).is_file()
            if finished and not sequential:
                with phase("capture"):
                    _forward_all(block, store, device, feed, next_store)
            if finished:
                reports += [LayerReport(**r) for r in load_quantized(block, block_dir)["extra"]["report"]]
            else:
                # parallel: the calibration pass over the full-precision block also yields the next block's calls
                calib_feed = None if sequential else feed
                layers = _quantize_block(block, name, lambda b: _forward_all(b, store, device, calib_feed, next_store),
                                         config)
                writer.submit(block, block_dir, config, layers)
                reports += layers
            if sequential:
                with phase("capture"):
                    _forward_all(block, store, device, feed, next_store)
            block.to(home)
            store = next_store
    if activations == "disk":
        shutil.rmtree(work_dir / "activations", ignore_errors=True)
    return QuantizationReport(reports)


def finished_blocks(work_dir: str | Path) -> int:
    """How many blocks of the run in ``work_dir`` are finished (for progress reports and tests)."""
    blocks = Path(work_dir) / "blocks"
    return sum(1 for d in blocks.iterdir() if (d / CONFIG_NAME).is_file()) if blocks.is_dir() else 0

