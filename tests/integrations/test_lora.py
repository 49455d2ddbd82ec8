"""LoRA on SVDQuant FLUX without re-quantization: formats, exactness, strength, several LoRAs, removal, errors."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tests.integrations.diffusers.tiny_models import FAST, flux_inputs, samples_from, tiny_flux  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402

from quantduo.integrations.diffusers import (FusedFluxSingleBlock, enable_fusions, quantization_config,  # noqa: E402
                                             quantize_transformer)
from quantduo.integrations.lora import (  # noqa: E402
    LoraFormatError, attach_lora, attached_loras, read_lora, remove_lora, set_lora_strength,
)
from quantduo.svdquant import SVDQuantLinear, set_execution  # noqa: E402

RANK = 4
DOUBLE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "attn.add_q_proj"]


@pytest.fixture(scope="module")
def models():
    """(full-precision tiny FLUX, its SVDQuant copy)."""
    fp = tiny_flux(seed=3)
    quant = copy.deepcopy(fp)
    quantize_transformer(quant, samples_from(lambda s: flux_inputs(fp, s), 2),
                         quantization_config(quant, smooth=False, **FAST), progress=False)
    return fp, quant


def random_lora(model, seed: int, magnitude: float = 0.3, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """diffusers/PEFT-format LoRA on the double block's attention / MLP and the single block's q and proj_out."""
    g = torch.Generator().manual_seed(seed)
    names = [f"transformer_blocks.0.{t}" for t in DOUBLE_TARGETS] + [
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out", "context_embedder"]
    state = {}
    for name in names:
        m = model.get_submodule(name)
        state[f"{prefix}{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) / m.in_features ** 0.5
        state[f"{prefix}{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * magnitude
    return state


def run(model, seed=7):
    with torch.no_grad():
        return model(**flux_inputs(model, seed))[0]


def test_lora_adds_exactly_the_low_rank_term(models):
    """On one quantized layer: y_lora - y = strength * scale * x A^T B^T (smoothing accounted for)."""
    _, quant = models
    model = copy.deepcopy(quant)
    name = "transformer_blocks.0.ff.net.2"
    layer = model.get_submodule(name)
    assert isinstance(layer, SVDQuantLinear)
    with torch.no_grad():
        layer.smooth_factor.uniform_(0.5, 2.0)  # non-trivial smoothing: the LoRA must undo it
    a = torch.randn(RANK, layer.in_features) * 0.1
    b = torch.randn(layer.out_features, RANK) * 0.1
    x = torch.randn(5, layer.in_features)
    before = layer(x).float()
    attach_lora(model, {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b, f"{name}.alpha": torch.tensor(8.0)},
                "one", strength=0.7)
    delta = layer(x).float() - before
    expected = 0.7 * (8.0 / RANK) * x @ a.T @ b.T
    assert relative_error(delta, expected) < 2e-2  # bf16 low-rank branch
    assert layer.rank == layer._quantduo_base_rank + RANK


def test_quantized_lora_matches_full_precision_lora(models):
    """Quantized + LoRA vs full precision + the same LoRA applied by diffusers/PEFT: within the quantization error."""
    fp, quant = models
    lora = random_lora(fp, seed=1)
    ref_fp, ref_q = run(fp), run(quant)
    fp_lora = copy.deepcopy(fp)
    fp_lora.load_lora_adapter(lora, prefix="transformer", adapter_name="style")
    ref_fp_lora = run(fp_lora)
    q_lora = copy.deepcopy(quant)
    attach_lora(q_lora, lora, "style")
    out = run(q_lora)
    quant_err, lora_effect = relative_error(ref_q, ref_fp), relative_error(ref_fp_lora, ref_fp)
    err = relative_error(out, ref_fp_lora)
    assert lora_effect > 5 * quant_err  # the LoRA changes the output much more than quantization does
    assert err < 1.5 * quant_err + 1e-3, (err, quant_err, lora_effect)


def test_lora_on_fp8_execution(models):
    """In fp8 execution with the fusions (fused GELU MLPs and single blocks keep the layer names) a LoRA attaches to
    the same layers and matches full precision + the LoRA within the quantization error."""
    fp, quant = models
    lora = random_lora(fp, seed=1)
    fp_lora = copy.deepcopy(fp)
    fp_lora.load_lora_adapter(lora, prefix="transformer", adapter_name="style")
    q8 = copy.deepcopy(quant)
    assert set_execution(q8, "fp8") > 0 and enable_fusions(q8)
    assert isinstance(q8.single_transformer_blocks[0], FusedFluxSingleBlock)
    attach_lora(q8, lora, "style")
    quant_err = relative_error(run(quant), run(fp))
    assert relative_error(run(q8), run(fp_lora)) < 1.5 * quant_err + 1e-3


def test_kohya_bfl_names_equal_diffusers_names(models):
    """A kohya LoRA in the original FLUX naming (fused qkv, single-block linear1) splits onto the diffusers modules."""
    _, quant = models
    g = torch.Generator().manual_seed(5)
    d, mlp = 128, 512
    a_qkv, b_qkv = torch.randn(RANK, d, generator=g) * 0.1, torch.randn(3 * d, RANK, generator=g) * 0.1
    a_l1, b_l1 = torch.randn(RANK, d, generator=g) * 0.1, torch.randn(3 * d + mlp, RANK, generator=g) * 0.1
    kohya = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a_qkv,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b_qkv,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(RANK)),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": a_l1,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": b_l1,
    }
    diffusers_fmt = {}
    for names, a, b in [(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"], a_qkv, b_qkv),
                        ([f"single_transformer_blocks.0.attn.to_{c}" for c in "qkv"] + ["single_transformer_blocks.0.proj_mlp"], a_l1, b_l1)]:
        for name, b_part in zip(names, b.split([d, d, d, mlp][: len(names)])):
            diffusers_fmt[f"{name}.lora_A.weight"], diffusers_fmt[f"{name}.lora_B.weight"] = a, b_part
    m1, m2 = copy.deepcopy(quant), copy.deepcopy(quant)
    assert len(attach_lora(m1, kohya, "k")) == 7
    attach_lora(m2, diffusers_fmt, "d")
    assert torch.equal(run(m1), run(m2))
    # kohya keys with diffusers module names are read too
    underscored = {f"lora_transformer_{k.rsplit('.lora_', 1)[0].replace('.', '_')}.lora_{'down' if '.lora_A.' in k else 'up'}.weight": v
                   for k, v in diffusers_fmt.items()}
    assert set(read_lora(underscored, quant)) == set(read_lora(diffusers_fmt, quant))


def test_strength_several_loras_and_removal(models):
    _, quant = models
    model = copy.deepcopy(quant)
    base = run(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    attach_lora(model, random_lora(model, 1), "a", strength=1.0)
    only_a = run(model)
    attach_lora(model, random_lora(model, 2), "b", strength=0.5)
    assert attached_loras(model) == {"a": 1.0, "b": 0.5}
    both = run(model)
    set_lora_strength(model, "b", 0.0)
    assert relative_error(run(model), only_a) < 1e-5
    set_lora_strength(model, "b", 0.5)
    assert relative_error(run(model), both) < 1e-5
    remove_lora(model, "a")
    remove_lora(model, "b")
    assert attached_loras(model) == {}
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert torch.equal(run(model), base)
    assert relative_error(only_a, base) > 0.05


def test_bad_loras_are_rejected(models):
    _, quant = models
    model = copy.deepcopy(quant)
    good = random_lora(model, 1)
    wrong_shape = dict(good)
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    wrong_shape[key] = torch.randn(RANK, 77)
    with pytest.raises(LoraFormatError, match="in_features"):
        attach_lora(model, wrong_shape, "x")
    with pytest.raises(LoraFormatError, match="does not exist"):
        attach_lora(model, {"transformer.nope.lora_A.weight": torch.ones(1, 1), "transformer.nope.lora_B.weight": torch.ones(1, 1)}, "x")
    with pytest.raises(LoraFormatError, match="unrecognised"):
        attach_lora(model, {"some.random.key": torch.ones(1)}, "x")
    with pytest.raises(LoraFormatError, match="lacks"):
        attach_lora(model, {key: good[key]}, "x")
    assert attached_loras(model) == {}  # nothing half-attached
    attach_lora(model, good, "x")
    with pytest.raises(ValueError, match="already attached"):
        attach_lora(model, good, "x")
    with pytest.raises(KeyError):
        remove_lora(model, "missing")


# ---------------------------------------------------------------------------------------------
# LoRA files as diffusers / PEFT write them: alpha from their adapter config, text-encoder parts, BFL embedders
# ---------------------------------------------------------------------------------------------
PEFT_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff.net.2",
                "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_v", "context_embedder"]


def peft_adapted(fp, seed: int, **config):
    """(fp model with a PEFT LoRA (random A / B), its LoraConfig) — alpha != rank."""
    from peft import LoraConfig

    cfg = LoraConfig(r=RANK, lora_alpha=16, target_modules=PEFT_TARGETS, **config)
    model = copy.deepcopy(fp)
    model.add_adapter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "lora_B" in name else 1 / p.shape[1] ** 0.5))
    return model, cfg


def diffusers_lora_file(fp, tmp_path, seed: int, text_encoder: bool = False, **config):
    """A LoRA written by diffusers' own ``FluxPipeline.save_lora_weights`` (adapter metadata in the file), and the
    fp model with that file loaded by diffusers' own loader."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    adapted, cfg = peft_adapted(fp, seed, **config)
    te = {"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(RANK, 64),
          "text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, RANK)} if text_encoder else None
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(adapted),
                                   text_encoder_lora_layers=te, transformer_lora_adapter_metadata=cfg.to_dict())
    ref = copy.deepcopy(fp)
    ref.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    return tmp_path / "pytorch_lora_weights.safetensors", ref


def attached(model, source, name="lora"):
    model = copy.deepcopy(model)
    attach_lora(model, source, name)
    return model


def assert_matches(models, ref, source):
    """On the unquantized model the LoRA equals diffusers / PEFT's to float rounding; on the quantized one it is
    within the quantization error."""
    fp, quant = models
    assert relative_error(run(attached(fp, source)), run(ref)) < 1e-5
    quant_err = relative_error(run(quant), run(fp))
    assert relative_error(run(ref), run(fp)) > 5 * quant_err  # the LoRA matters
    assert relative_error(run(attached(quant, source)), run(ref)) < 3 * quant_err


@pytest.mark.parametrize("config", [{}, {"use_rslora": True},
                                    {"rank_pattern": {"to_k": 2}, "alpha_pattern": {"ff.net.2": 64}}])
def test_alpha_from_diffusers_metadata_matches_diffusers(models, tmp_path, config):
    from safetensors.torch import load_file

    path, ref = diffusers_lora_file(models[0], tmp_path, seed=11, **config)
    assert_matches(models, ref, path)
    # the tensors alone (no adapter config) are scale 1: far from what diffusers computes
    assert relative_error(run(attached(models[0], load_file(str(path)))), run(ref)) > 0.02


def test_peft_folder_with_adapter_config_matches_peft(models, tmp_path):
    """A PEFT ``save_pretrained`` folder (adapter_model.safetensors + adapter_config.json, lora_alpha != r)."""
    from peft import get_peft_model

    fp, quant = models
    adapted, cfg = peft_adapted(fp, seed=12, use_rslora=True)
    peft_model = get_peft_model(copy.deepcopy(fp), cfg)
    peft_model.load_state_dict({f"base_model.model.{k}": v for k, v in adapted.state_dict().items()
                                if "lora_" in k and "default" in k}, strict=False)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert_matches(models, peft_model, tmp_path / "adapter")


def test_text_encoder_keys_are_reported_and_the_transformer_part_applied(models, tmp_path):
    from quantduo.integrations.lora import LoraKeysSkipped

    fp, quant = models
    path, ref = diffusers_lora_file(fp, tmp_path, seed=13, text_encoder=True)
    with pytest.warns(LoraKeysSkipped, match=r"2 LoRA keys not applied \(text encoders.*text_encoder\.text_model"):
        assert_matches(models, ref, path)
    kohya_te = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, 64),
                "lora_unet_txt_in.lora_down.weight": torch.randn(RANK, 64), "lora_unet_txt_in.lora_up.weight":
                torch.randn(128, RANK), "lora_unet_txt_in.alpha": torch.tensor(2.0)}
    with pytest.warns(LoraKeysSkipped, match="lora_te1_"):
        assert attach_lora(copy.deepcopy(quant), kohya_te, "k") == ["context_embedder"]


def test_bfl_embedder_and_final_layer_names_match_diffusers(models, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    fp, quant = models
    g = torch.Generator().manual_seed(14)
    kohya = {}
    for name, module in [("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                         ("time_in_in_layer", "time_text_embed.timestep_embedder.linear_1"),
                         ("vector_in_in_layer", "time_text_embed.text_embedder.linear_1"),
                         ("final_layer_linear", "proj_out"), ("final_layer_adaLN_modulation_1", "norm_out.linear")]:
        m = fp.get_submodule(module)
        kohya[f"lora_unet_{name}.lora_down.weight"] = torch.randn(RANK, m.in_features, generator=g) / m.in_features ** 0.5
        kohya[f"lora_unet_{name}.lora_up.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.3
        if not name.startswith("final_layer"):  # diffusers drops final_layer alphas (kohya scales them: we do)
            kohya[f"lora_unet_{name}.alpha"] = torch.tensor(8.0)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    state, alphas = FluxPipeline.lora_state_dict(str(tmp_path / "kohya.safetensors"), return_alphas=True)
    ref = copy.deepcopy(fp)
    ref.load_lora_adapter(state, network_alphas=alphas, prefix=None)  # diffusers' converted (alpha-scaled) keys
    assert len(attach_lora(copy.deepcopy(quant), tmp_path / "kohya.safetensors", "bfl")) == 6
    assert_matches(models, ref, tmp_path / "kohya.safetensors")


def _bfl_qkv_lora(g, d: int, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, d, generator=g) / d ** 0.5, torch.randn(3 * d, rank, generator=g) * 0.3


def test_comfyui_bfl_and_xlabs_names_equal_kohya(models):
    """The same fused qkv / projection LoRA written as kohya BFL names (tested against diffusers above), ComfyUI's
    ``diffusion_model.`` names (diffusers renames them to kohya's), the original names with lora_A / lora_B, and
    XLabs' ``processor.qkv_lora1`` (image stream) / ``proj_lora2`` (text stream) keys, converted by diffusers' own
    ``_convert_xlabs_flux_lora_to_diffusers``: every module gets the same factors."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    from quantduo.integrations.lora import LoraKeysSkipped

    _, quant = models
    d = quant.get_submodule("transformer_blocks.0.attn.to_q").in_features
    g = torch.Generator().manual_seed(21)
    (qa, qb), (pa, pb) = _bfl_qkv_lora(g, d), (torch.randn(RANK, d, generator=g), torch.randn(d, RANK, generator=g))
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qa,
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qb,
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(RANK)),
             "lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight": pa,
             "lora_unet_double_blocks_0_txt_attn_proj.lora_up.weight": pb,
             "lora_unet_double_blocks_0_txt_attn_proj.alpha": torch.tensor(float(RANK))}
    comfy = {k.replace("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv")
             .replace("lora_unet_double_blocks_0_txt_attn_proj", "diffusion_model.double_blocks.0.txt_attn.proj"): v
             for k, v in kohya.items()}
    original = {"double_blocks.0.img_attn.qkv.lora_A.weight": qa, "double_blocks.0.img_attn.qkv.lora_B.weight": qb,
                "diffusion_model.double_blocks.0.txt_attn.proj.lora_A.weight": pa,
                "diffusion_model.double_blocks.0.txt_attn.proj.lora_B.weight": pb}
    xlabs = {"double_blocks.0.processor.qkv_lora1.down.weight": qa, "double_blocks.0.processor.qkv_lora1.up.weight": qb,
             "double_blocks.0.processor.proj_lora2.down.weight": pa, "double_blocks.0.processor.proj_lora2.up.weight": pb}
    expected = read_lora(kohya, quant)
    assert sorted(expected) == ["transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn.to_k",
                                "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"]
    by_diffusers = _convert_xlabs_flux_lora_to_diffusers(dict(xlabs))
    # ComfyUI's lora_A / lora_B with its .alpha under diffusion_model. (alpha half the rank: scale 0.5), and a
    # ComfyUI text-encoder key (text_encoders.<name>.), reported and skipped
    comfy_ab = {k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"):
                (torch.tensor(RANK / 2) if k.endswith(".alpha") else v) for k, v in comfy.items()}
    comfy_ab["text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = qa
    for source in (comfy, original, xlabs, by_diffusers, comfy_ab):
        if source is comfy_ab:
            with pytest.warns(LoraKeysSkipped, match="text_encoders.clip_l"):
                got = read_lora(source, quant)
        else:
            got = read_lora(source, quant)
        assert sorted(got) == sorted(expected)
        for name, f in got.items():
            torch.testing.assert_close(f.down, expected[name].down)
            torch.testing.assert_close(f.up, expected[name].up)
            assert f.scale == (0.5 if source is comfy_ab else 1.0) and expected[name].scale == 1.0


def test_ambiguous_dora_and_dropped_keys(models, tmp_path):
    """Two adapters, or two key formats for one layer, raise instead of one silently winning; DoRA raises; the bias /
    norm deltas diffusers drops are skipped with a warning; a checkpoint or export with LoRAs attached is refused."""
    from quantduo.integrations.lora import LoraKeysSkipped
    from quantduo.integrations.published import export_checkpoint
    from quantduo.svdquant.serialization import checkpoint_state

    _, quant = models
    d = quant.get_submodule("transformer_blocks.0.attn.to_q").in_features
    a, b = torch.randn(RANK, d), torch.randn(d, RANK)
    q = "transformer.transformer_blocks.0.attn.to_q"
    with pytest.raises(LoraFormatError, match="several PEFT adapters"):
        read_lora({f"{q}.lora_A.style.weight": a, f"{q}.lora_B.style.weight": b,
                   "transformer.transformer_blocks.0.attn.to_k.lora_A.detail.weight": a,
                   "transformer.transformer_blocks.0.attn.to_k.lora_B.detail.weight": b}, quant)
    with pytest.raises(LoraFormatError, match="both give the A matrix"):
        read_lora({f"{q}.lora_A.style.weight": a, f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b}, quant)
    qa, qb = _bfl_qkv_lora(torch.Generator().manual_seed(3), d)
    with pytest.raises(LoraFormatError, match="reach module 'transformer_blocks.0.attn.to_q'"):
        read_lora({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b,
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qa,
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qb}, quant)
    with pytest.raises(LoraFormatError, match="DoRA"):
        read_lora({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b, f"{q}.lora_magnitude_vector.weight": b[:, 0]},
                  quant)
    with pytest.warns(LoraKeysSkipped, match="lora_unet_double_blocks_0_img_attn_proj.diff_b"):
        got = read_lora({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b,
                         "lora_unet_double_blocks_0_img_attn_proj.diff_b": torch.zeros(d)}, quant)
    assert list(got) == ["transformer_blocks.0.attn.to_q"]
    model = copy.deepcopy(quant)
    attach_lora(model, {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b}, "style")
    with pytest.raises(ValueError, match=r"LoRAs \['style'\] are attached"):
        checkpoint_state(model)
    with pytest.raises(ValueError, match=r"LoRAs \['style'\] are attached"):
        export_checkpoint(model, tmp_path / "x.safetensors", "nunchaku")
    assert not (tmp_path / "x.safetensors").exists()
    remove_lora(model, "style")
    checkpoint_state(model)  # fine again


def test_xlabs_single_block_keys_are_what_diffusers_converts(models):
    """XLabs' single-block processor LoRAs (``qkv_lora``: the attention's q / k / v rows of linear1; ``proj_lora``:
    linear2, all of proj_out's inputs) read as the diffusers keys diffusers' own converter makes of them; a double
    block's processor key without its stream number is refused."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    _, quant = models
    d = quant.get_submodule("single_transformer_blocks.0.attn.to_q").in_features
    k_out = quant.get_submodule("single_transformer_blocks.0.proj_out").in_features
    g = torch.Generator().manual_seed(23)
    (qa, qb), pa, pb = _bfl_qkv_lora(g, d), torch.randn(RANK, k_out, generator=g), torch.randn(d, RANK, generator=g)
    xlabs = {"single_blocks.0.processor.qkv_lora.down.weight": qa, "single_blocks.0.processor.qkv_lora.up.weight": qb,
             "single_blocks.0.processor.proj_lora.down.weight": pa, "single_blocks.0.processor.proj_lora.up.weight": pb}
    expected = read_lora(_convert_xlabs_flux_lora_to_diffusers(dict(xlabs)), quant)
    # proj_out is the quantized model's split proj_out: the LoRA goes to its halves by input columns
    assert sorted(expected) == ["single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_q",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_out.mlp_fc2",
                                "single_transformer_blocks.0.proj_out.out_proj"]
    got = read_lora(xlabs, quant)
    assert sorted(got) == sorted(expected)
    for name, f in got.items():
        torch.testing.assert_close(f.down, expected[name].down)
        torch.testing.assert_close(f.up, expected[name].up)
        assert f.scale == expected[name].scale
    with pytest.raises(LoraFormatError, match="unrecognised"):
        read_lora({"double_blocks.0.processor.qkv_lora.down.weight": qa,
                   "double_blocks.0.processor.qkv_lora.up.weight": qb}, quant)


def test_peft_lora_bias_matches_diffusers(models, tmp_path):
    """PEFT's ``lora_bias`` (B with a bias, scaled as B) written and loaded by diffusers: quantduo adds it to each
    layer's bias (on one half of a split proj_out only), re-weights it with the LoRA's strength and removes
    it exactly."""
    from safetensors.torch import load_file

    fp, quant = models
    path, ref = diffusers_lora_file(fp, tmp_path, seed=17, lora_bias=True)
    assert any(k.endswith("lora_B.bias") for k in load_file(str(path)))
    assert_matches(models, ref, path)
    without_bias = {k: v for k, v in load_file(str(path)).items() if not k.endswith("lora_B.bias")}
    assert relative_error(run(attached(fp, without_bias)), run(ref)) > 1e-3  # the bias term matters here
    model = attached(quant, path)
    set_lora_strength(model, "lora", 0.0)
    assert relative_error(run(model), run(quant)) < 1e-6
    remove_lora(model, "lora")
    for name, module in quant.named_modules():
        if getattr(module, "bias", None) is not None:
            assert torch.equal(model.get_submodule(name).bias, module.bias), name
