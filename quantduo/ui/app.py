"""The Gradio page of ``quantduo serve``: an Image tab (SVDQuant diffusion) and a Long-context tab (DuoAttention).

All model work goes through :mod:`quantduo.ui.backend` and runs one job at a time through
:class:`quantduo.ui.jobs.JobRunner` (bounded waiting line, progress, cancel).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np

from . import backend as B
from .jobs import Done, JobRunner

MAX_LORAS = 4  # Handlers.generate takes one name and one strength parameter per slot
DIGIT_CHOICES = ["from prompt"] + [str(d) for d in range(10)]
@dataclass
class ServeConfig:
    """What ``quantduo serve`` serves: image model specs, the LM, limits."""

    models: list[str] = field(default_factory=lambda: [B.TINY_DIT])
    llm: str | None = None
    pattern: str | None = None
    sparsity: float = 0.5
    cache_dir: Path = Path.home() / ".cache" / "quantduo" / "ui"
    max_waiting: int = 2
    max_upload_bytes: int = B.MAX_UPLOAD_BYTES
    base: str | None = None


class Models:
    """Loaded engines (image engines loaded on first use, under a job so the page shows it)."""

    def __init__(self, config: ServeConfig, log=print):
        self.config, self.log = config, log
        self.images: dict[str, B.ImageEngine] = {}
        self._llm: B.LongContextEngine | None = None
        self._load_lock = threading.Lock()

    def image(self, spec: str, job: B.Job | None = None) -> B.ImageEngine:
        if spec not in self.config.models:
            raise B.UserError(f"unknown model {spec!r}; this server has {', '.join(self.config.models)}")
        with self._load_lock:
            if spec not in self.images:
                if job is not None:
                    job.start_stage(f"loading {spec} (once)", 0)
                self.images[spec] = B.make_image_engine(spec, self.config.cache_dir, self.log, self.config.base)
        return self.images[spec]

    def llm(self) -> B.LongContextEngine:
        with self._load_lock:
            if self._llm is None:
                self._llm = B.LongContextEngine(self.config.llm, self.config.pattern, self.config.sparsity)
        return self._llm


# ---------------------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def image_metrics(r: B.ImageResult) -> str:
    """Markdown table of a result: step time and weight memory (and the reference's, with PSNR)."""
    rows = [f"| {r.execution} | {r.step_ms:.1f} ms | {_mb(r.weight_bytes)} |"]
    if r.reference is not None:
        rows.append(f"| {r.reference_execution} | {r.reference_step_ms:.1f} ms | {_mb(r.reference_weight_bytes)} |")
    text = "| execution | time per step | weight memory |\n| --- | --- | --- |\n" + "\n".join(rows)
    if r.psnr_db is not None:
        text += "\n\nPSNR vs " + r.reference_execution + (": identical" if math.isinf(r.psnr_db)
                                                          else f": **{r.psnr_db:.1f} dB**")
    return text + (f"\n\n{r.note}" if r.note else "")


def llm_metrics(result: dict, mode: str) -> str:
    r = result[mode]
    tps = "-" if math.isnan(r["tokens_per_s"]) else f"{r['tokens_per_s']:.1f}"
    return (f"time to first token **{1e3 * r['ttft_s']:.0f} ms** · **{tps}** tokens/s · "
            f"KV cache **{r['kv_bytes']:,} bytes** ({r['new_tokens']} new tokens, prompt {result['prompt_tokens']:,})")


def heatmap(engine: B.LongContextEngine):
    """Matplotlib figure of the head gates [layers, KV heads]; retrieval heads marked R."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates, retrieval = engine.pattern.gates, engine.retrieval
    fig, ax = plt.subplots(figsize=(1.6 + 0.5 * gates.shape[1], 0.8 + 0.35 * gates.shape[0]))
    im = ax.imshow(gates, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    if retrieval.size <= 2048:
        for (i, j), r in np.ndenumerate(retrieval):
            if r:
                ax.text(j, i, "R", ha="center", va="center", color="red", fontsize=8)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{engine.name}: gates (R = retrieval, {int(retrieval.sum())}/{retrieval.size} heads)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    plt.close(fig)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------------------------------------------
class Handlers:
    """Event handlers of the page; each generator yields (outputs...) tuples, status last."""

    def __init__(self, models: Models, runner: JobRunner):
        self.models, self.runner = models, runner

    @staticmethod
    def _session(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or ""

    def _run(self, label, fn, request, n_outputs):
        """Drive a job: yield ``n_outputs`` skips + status while it runs; return its :class:`Done`."""
        skip = (gr.skip(),) * n_outputs
        for item in self.runner.run(label, fn, self._session(request)):
            if isinstance(item, Done):
                return item
            yield (*skip, item)
        raise RuntimeError("job ended without a result")

    def _finish(self, done: Done, n_outputs: int):
        """Outputs for a failed or cancelled job; raises gr.Error (a readable message) for errors."""
        if done.cancelled:
            return (*(gr.skip(),) * n_outputs, f"**cancelled** ({done.error})")
        raise gr.Error(done.error, print_exception=False)

    def generate(self, model, prompt, digit, seed, steps, size, execution, compare, name0, name1, name2, name3,
                 strength0, strength1, strength2, strength3, request: gr.Request = None):
        """Image tab: draw one image (and the bf16 reference when ``compare``); the LoRA slots' names and strengths
        are explicit parameters (Gradio passes ``request`` only to functions without ``*args``)."""
        names, strengths = (name0, name1, name2, name3), (strength0, strength1, strength2, strength3)
        req = B.ImageRequest(prompt=prompt or "", digit=None if digit in (None, "from prompt") else int(digit),
                             seed=_int(seed, "seed"), steps=_int(steps, "steps"), size=_int(size, "size"),
                             execution=execution or "auto", compare=bool(compare),
                             loras={n: float(s) for n, s in zip(names, strengths) if n})
        if req.digit is None and model == B.TINY_DIT:
            _check(lambda: B.digit_from_prompt(req.prompt))
        elif not req.prompt.strip() and model != B.TINY_DIT:
            raise gr.Error("the prompt is empty", print_exception=False)
        start = time.perf_counter()

        def work(job):
            return self.models.image(model, job).generate(req, job)

        done = yield from self._run("image generation", work, request, 3)
        if done.error:
            yield self._finish(done, 3)
            return
        r = done.result
        yield (r.image, r.reference, image_metrics(r), f"done in {time.perf_counter() - start:.1f} s")

    def attach(self, model, files, request: gr.Request = None):
        """Attach uploaded LoRA files (several at once) to the model; refreshes the LoRA slots."""
        if not files:
            raise gr.Error("choose one or more LoRA .safetensors files first", print_exception=False)
        paths = [Path(f if isinstance(f, str) else f.name) for f in files]

        def work(job):
            engine = self.models.image(model, job)
            if len(engine.loras) + len(paths) > MAX_LORAS:
                raise B.UserError(f"at most {MAX_LORAS} LoRAs at once: detach one first")
            return [engine.attach_lora(p) for p in paths]

        n = 3 * MAX_LORAS + 1
        done = yield from self._run("attaching LoRAs", work, request, n)
        if done.error:
            yield self._finish(done, n)
            return
        yield (*self.lora_slots(model), None, f"attached {', '.join(done.result)}")

    def detach(self, model, name, request: gr.Request = None):
        """Detach one LoRA (no reload); refreshes the LoRA slots."""
        n = 3 * MAX_LORAS
        done = yield from self._run("detaching a LoRA", lambda job: self.models.image(model, job).detach_lora(name),
                                    request, n)
        if done.error:
            yield self._finish(done, n)
            return
        yield (*self.lora_slots(model), f"detached {name}")

    def lora_slots(self, model) -> list:
        """Updates for the LoRA rows: (row, name, strength) per slot."""
        engine = self.models.images.get(model)
        items = list(engine.loras.items()) if engine else []
        out = []
        for i in range(MAX_LORAS):
            name, strength = items[i] if i < len(items) else ("", 1.0)
            out += [gr.update(visible=bool(name)), name, strength]
        return out

    def model_changed(self, model):
        """New model: its executions, default size/steps and prompt hint; its LoRA slots."""
        cls = B.engine_class(model)
        return (gr.update(choices=list(cls.executions), value="auto"), gr.update(value=cls.default_size),
                gr.update(value=cls.default_steps), gr.update(placeholder=cls.prompt_hint),
                gr.update(visible=model == B.TINY_DIT), *self.lora_slots(model))

    def cancel(self, request: gr.Request = None) -> str:
        n = self.runner.cancel(self._session(request))
        return "cancelling..." if n else "nothing to cancel"

    def ask(self, upload, document, question, max_new, request: gr.Request = None):
        """Long-context tab: the question about the document, with DuoAttention and with full attention."""
        limit = self.models.config.max_upload_bytes
        if upload:
            document = _check(lambda: B.read_text_upload(upload if isinstance(upload, str) else upload.name, limit))
        n_new = _int(max_new, "new tokens")

        def work(job):
            return self.models.llm().answer(document or "", question or "", n_new, job)

        done = yield from self._run("long-context answer", work, request, 4)
        if done.error:
            yield self._finish(done, 4)
            return
        r = done.result
        yield (r["duo"]["answer"], llm_metrics(r, "duo"), r["full"]["answer"], llm_metrics(r, "full"),
               f"done: {r['prompt_tokens']:,} prompt tokens")

    def example(self):
        """A tiny-LM document with a passkey far from the question."""
        if self.models.config.llm is not None:
            raise gr.Error("the example is written in the tiny LM's words: paste your own text", print_exception=False)
        text, question, answer = B.tiny_lm_example()
        return None, text, question, f"example loaded: the expected answer is `{answer}`"


def _int(value, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{what} must be a whole number, got {value!r}", print_exception=False) from None
    if not number.is_integer():
        raise gr.Error(f"{what} must be a whole number, got {value!r}", print_exception=False)
    return int(number)


def _check(fn):
    """Run ``fn``; a :class:`~quantduo.ui.backend.UserError` becomes a readable gr.Error."""
    try:
        return fn()
    except B.UserError as err:
        raise gr.Error(str(err), print_exception=False) from None


# ---------------------------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------------------------
def _image_tab(h: Handlers, config: ServeConfig) -> None:
    first = B.engine_class(config.models[0])
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown(config.models, value=config.models[0], label="model", elem_id="model")
            prompt = gr.Textbox(label="prompt", placeholder=first.prompt_hint, elem_id="prompt")
            digit = gr.Dropdown(DIGIT_CHOICES, value="from prompt", label="digit (tiny DiT)", elem_id="digit",
                                visible=config.models[0] == B.TINY_DIT)
            with gr.Row():
                seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                steps = gr.Number(first.default_steps, precision=0, label="steps", elem_id="steps")
                size = gr.Number(first.default_size, precision=0, label="size (pixels a side)", elem_id="size")
            execution = gr.Dropdown(list(first.executions), value="auto", label="execution", elem_id="execution")
            compare = gr.Checkbox(False, label="also draw with the bf16 model (side by side, PSNR)", elem_id="compare")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-image")
            with gr.Accordion("LoRAs", open=False):
                files = gr.File(file_count="multiple", file_types=[".safetensors"], label="LoRA files",
                                elem_id="lora-files")
                attach = gr.Button("Attach", elem_id="attach")
                slots = []
                for i in range(MAX_LORAS):
                    with gr.Row(visible=False) as row:
                        name = gr.Textbox(label="LoRA", interactive=False, scale=2)
                        strength = gr.Slider(-2, 2, value=1.0, step=0.05, label="strength", scale=3)
                        detach = gr.Button("Detach", scale=1, min_width=60)
                    slots.append((row, name, strength, detach))
        with gr.Column(scale=1):
            status = gr.Markdown("ready", elem_id="image-status")
            with gr.Row():
                image = gr.Image(label="image", format="png", type="numpy", interactive=False, elem_id="image")
                reference = gr.Image(label="bf16 reference", format="png", type="numpy", interactive=False,
                                     elem_id="reference")
            metrics = gr.Markdown(elem_id="image-metrics")
    slot_outputs = [c for row, name, strength, _ in slots for c in (row, name, strength)]
    names, strengths = [s[1] for s in slots], [s[2] for s in slots]
    generate.click(h.generate, [model, prompt, digit, seed, steps, size, execution, compare, *names, *strengths],
                           [image, reference, metrics, status], api_name="generate", concurrency_limit=8)
    prompt.submit(h.generate, [model, prompt, digit, seed, steps, size, execution, compare, *names, *strengths],
                  [image, reference, metrics, status], api_visibility="private", concurrency_limit=8)
    cancel.click(h.cancel, None, status, api_name="cancel", concurrency_limit=None)
    attach.click(h.attach, [model, files], [*slot_outputs, files, status], api_name="attach_loras", concurrency_limit=8)
    for i, (_, name, _, detach) in enumerate(slots):
        detach.click(h.detach, [model, name], [*slot_outputs, status], api_name=f"detach_{i}", concurrency_limit=8)
    model.change(h.model_changed, model, [execution, size, steps, prompt, digit, *slot_outputs],
                 api_visibility="private")


def _llm_tab(h: Handlers, config: ServeConfig) -> None:
    engine = h.models.llm()
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label=f"text file (up to {config.max_upload_bytes / 2**20:.0f} MB)", type="filepath",
                             elem_id="upload")
            document = gr.Textbox(label="... or paste the document", lines=8, max_lines=16, elem_id="document")
            question = gr.Textbox(label="question", elem_id="question")
            max_new = gr.Number(8 if config.llm is None else 64, precision=0, label="new tokens", elem_id="max-new")
            with gr.Row():
                example = gr.Button("Example", elem_id="example", visible=config.llm is None)
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-llm")
            gr.Plot(heatmap(engine), label="head pattern", elem_id="heatmap")
        with gr.Column(scale=1):
            status = gr.Markdown(f"ready: {engine.name}", elem_id="llm-status")
            with gr.Row():
                with gr.Column():
                    gr.Markdown(f"### DuoAttention ({int(engine.retrieval.sum())}/{engine.retrieval.size} "
                                "retrieval heads)")
                    duo_answer = gr.Textbox(label="answer", elem_id="duo-answer")
                    duo_metrics = gr.Markdown(elem_id="duo-metrics")
                with gr.Column():
                    gr.Markdown("### Full attention")
                    full_answer = gr.Textbox(label="answer", elem_id="full-answer")
                    full_metrics = gr.Markdown(elem_id="full-metrics")
    ask.click(h.ask, [upload, document, question, max_new], [duo_answer, duo_metrics, full_answer, full_metrics, status],
              api_name="ask", concurrency_limit=8)
    example.click(h.example, None, [upload, document, question, status], api_name="example")
    cancel.click(h.cancel, None, status, api_name="cancel_llm", concurrency_limit=None)


def build_app(config: ServeConfig, log=print) -> tuple[gr.Blocks, Handlers]:
    """The page and its handlers (models: the first image model and the LM are loaded now)."""
    models = Models(config, log)
    handlers = Handlers(models, JobRunner(config.max_waiting, log))
    models.image(config.models[0])
    with gr.Blocks(title="quantduo") as demo:
        gr.Markdown("# quantduo\nSVDQuant 4-bit diffusion and DuoAttention long-context LLMs")
        with gr.Tab("Image", elem_id="tab-image"):
            _image_tab(handlers, config)
        with gr.Tab("Long context", elem_id="tab-llm"):
            _llm_tab(handlers, config)
    demo.queue(max_size=32, default_concurrency_limit=8)
    return demo, handlers
