"""``quantduo serve`` through Gradio's Python client: images equal the library's, LoRAs, long context, bad input,
the bounded queue and cancellation."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from quantduo.cli import build_parser  # noqa: E402

from .helpers import library_digit, model_pixels, write_lora  # noqa: E402

NO_LORAS = ("",) * 4 + (1.0,) * 4


def generate(client, prompt="digit 7", digit="from prompt", seed=0, steps=8, size=8, execution="auto",
             compare=False, loras=NO_LORAS):
    return client.predict("tiny-dit", prompt, digit, seed, steps, size, execution, compare, *loras,
                          api_name="/generate")


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False)


def test_serve_is_registered():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, None)


def test_image_equals_library_and_reference(client, server):
    image, reference, metrics, status = generate(client, "a seven, please", seed=3, steps=10, compare=True)
    assert np.array_equal(model_pixels(image), library_digit(7, 3, 10, "int4", server[1]))
    assert np.array_equal(model_pixels(reference), library_digit(7, 3, 10, "bf16", server[1]))
    assert "PSNR vs bf16" in metrics and "weight memory" in metrics and "ms" in metrics
    assert status.startswith("done")
    image, reference, _, _ = generate(client, "", digit="4", seed=1, steps=6, execution="bf16")
    assert np.array_equal(model_pixels(image), library_digit(4, 1, 6, "bf16", server[1])) and reference is None


def test_other_size(client):
    image, *_ = generate(client, "digit 2", size=12, steps=4)
    assert model_pixels(image, size=12).shape == (12, 12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "the prompt is empty"),
    (dict(prompt="a cat"), "draws one digit"),
    (dict(size=7), "not a multiple of"),
    (dict(steps=0), "steps must be between"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(execution="fp8"), "not in the list of choices"),
])
def test_bad_image_input(client, kwargs, message):
    with pytest.raises(AppError, match=message):
        generate(client, **kwargs)


def test_loras_attach_reweight_detach(client, server, tmp_path):
    a = write_lora(tmp_path / "style_a.safetensors", ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0"],
                   seed=1)
    b = write_lora(tmp_path / "style_b.safetensors", ["single_transformer_blocks.0.attn.to_k"], seed=2)
    out = client.predict("tiny-dit", [handle_file(str(a)), handle_file(str(b))], api_name="/attach_loras")
    names = [out[2 * i] for i in range(4)]
    assert names[:2] == ["style_a", "style_b"] and names[2:] == ["", ""]
    assert "attached style_a, style_b" in out[-1]
    loras = ("style_a", "style_b", "", "", 0.7, -0.5, 1.0, 1.0)
    image, *_ = generate(client, "digit 5", seed=2, steps=6, loras=loras)
    expected = library_digit(5, 2, 6, "int4", server[1], loras=[(a, 0.7), (b, -0.5)])
    assert np.array_equal(model_pixels(image), expected)
    assert not np.array_equal(expected, library_digit(5, 2, 6, "int4", server[1]))
    zero, *_ = generate(client, "digit 5", seed=2, steps=6, loras=("style_a", "style_b", "", "", 0.0, 0.0, 1, 1))
    assert np.array_equal(model_pixels(zero), library_digit(5, 2, 6, "int4", server[1]))
    out = client.predict("tiny-dit", "style_a", api_name="/detach_0")
    assert [out[2 * i] for i in range(4)] == ["style_b", "", "", ""] and "detached style_a" in out[-1]
    out = client.predict("tiny-dit", "style_b", api_name="/detach_0")
    assert [out[2 * i] for i in range(4)] == ["", "", "", ""]
    image, *_ = generate(client, "digit 5", seed=2, steps=6)
    assert np.array_equal(model_pixels(image), library_digit(5, 2, 6, "int4", server[1]))


def test_lora_for_another_model(client, tmp_path):
    path = tmp_path / "sdxl_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(path))
    with pytest.raises(AppError, match="sdxl_lora.safetensors is not a LoRA for the bundled tiny digits DiT"):
        client.predict("tiny-dit", [handle_file(str(path))], api_name="/attach_loras")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(AppError, match="junk.safetensors is not a LoRA"):
        client.predict("tiny-dit", [handle_file(str(junk))], api_name="/attach_loras")
    assert generate(client)[3].startswith("done")  # still serving, nothing attached


def test_long_context_duo_vs_full(client):
    _, document, question, status = client.predict(api_name="/example")
    expected = status.split("`")[1]
    duo, duo_metrics, full, full_metrics, status = client.predict(None, document, question, 5, api_name="/ask")
    assert full == expected and duo == expected, (duo, full, expected)
    kv = [int(m.split("KV cache **")[1].split(" bytes")[0].replace(",", "")) for m in (duo_metrics, full_metrics)]
    assert kv[0] < kv[1]
    assert "time to first token" in duo_metrics and "tokens/s" in full_metrics and status.startswith("done")


def test_long_context_bad_input(client, tmp_path):
    with pytest.raises(AppError, match="the document is empty"):
        client.predict(None, "  ", "pass key A is", 5, api_name="/ask")
    with pytest.raises(AppError, match="not in the tiny LM vocabulary"):
        client.predict(None, "hello world", "pass key A is", 5, api_name="/ask")
    binary = tmp_path / "picture.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(AppError, match="picture.png is not a text file"):
        client.predict(handle_file(str(binary)), "", "pass key A is", 5, api_name="/ask")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(50 * 2**20 + 1)
    with pytest.raises(AppError, match="big.txt is 50.0 MB: the limit is 50 MB"):
        client.predict(handle_file(str(big)), "", "pass key A is", 5, api_name="/ask")
    text = tmp_path / "doc.txt"
    text.write_text(client.predict(api_name="/example")[1])
    duo, *_ = client.predict(handle_file(str(text)), "", "pass key A is", 2, api_name="/ask")
    assert duo


def _statuses(job) -> list[str]:
    return [out[-1] for out in job.outputs()]


def _wait(predicate, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_queue_busy_and_cancel(server):
    """One job runs, two wait (with a 'busy' status), a fourth is refused; cancel stops the running job at once."""
    clients = [Client(server[0], verbose=False) for _ in range(4)]
    long = ("tiny-dit", "digit 1", "from prompt", 0, 200, 32, "auto", False, *NO_LORAS)
    first = clients[0].submit(*long, api_name="/generate")
    assert _wait(lambda: any("sampling" in s for s in _statuses(first))), _statuses(first)
    waiting = [c.submit(*long, api_name="/generate") for c in clients[1:3]]
    for job in waiting:
        assert _wait(lambda: any(s.startswith("busy") and "queued" in s for s in _statuses(job))), _statuses(job)
    with pytest.raises(AppError, match="busy: image generation is running and 2 requests are waiting"):
        clients[3].predict(*long, api_name="/generate")
    start = time.time()
    assert clients[0].predict(api_name="/cancel") == "cancelling..."
    assert "cancelled" in first.result()[-1]
    assert time.time() - start < 3.0, "cancel did not stop the work"
    for c, job in zip(clients[1:3], waiting):  # the next in line starts; cancel it (and the last, while queued)
        assert c.predict(api_name="/cancel") == "cancelling..."
        assert "cancelled" in job.result()[-1]
    assert generate(clients[3])[3].startswith("done")
