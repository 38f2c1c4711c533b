"""validate works for every model kind: inputs from main_input_name and the config, or a skip with its reason.

Tiny random models of real transformers classes (text, vision with and without a head,
audio encoder-decoder, audio encoder (CTC), text encoder-decoder, encoder-only, causal LM), each through the
default stage list with quantization none and int8.
"""

import json
import shutil

import pytest
import torch
import transformers as T
from helpers import run_cli
from safetensors.torch import save_file

from pipeline import load
from pipeline.measure.inputs import build_inputs
from pipeline.measure.metrics import METRICS

STAGES = ["instantiate_empty", "plan", "quantize", "load_shards", "validate"]
VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)


def _kinds():
    return {
        "vit": (T.ViTModel, T.ViTConfig(**VIT)),
        "vit_classifier": (T.ViTForImageClassification, T.ViTConfig(**VIT, num_labels=3)),
        "whisper": (
            T.WhisperForConditionalGeneration,
            T.WhisperConfig(
                vocab_size=128,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                num_mel_bins=16,
                max_source_positions=30,
                max_target_positions=40,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
            ),
        ),
        "wav2vec2": (
            T.Wav2Vec2ForCTC,
            T.Wav2Vec2Config(
                vocab_size=32,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                conv_dim=(16, 16),
                conv_stride=(5, 2),
                conv_kernel=(10, 3),
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=2,
            ),
        ),
        "t5": (
            T.T5ForConditionalGeneration,
            T.T5Config(
                vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
            ),
        ),
        "bert": (
            T.BertModel,
            T.BertConfig(
                vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
            ),
        ),
        "llama": (
            T.LlamaForCausalLM,
            T.LlamaConfig(
                vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
            ),
        ),
    }


KINDS = list(_kinds())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> a checkpoint directory; ViT is saved under its in-memory tensor names (key conversion is not tested here)."""
    out = {}
    for kind, (cls, config) in _kinds().items():
        dest = tmp_path_factory.mktemp(kind)
        torch.manual_seed(0)
        model = cls(config).eval()
        if kind.startswith("vit"):
            config.architectures = [cls.__name__]  # what save_pretrained writes
            config.save_pretrained(dest)
            save_file({n: t.contiguous() for n, t in model.state_dict().items()}, dest / "model.safetensors")
        else:
            model.save_pretrained(dest)
        out[kind] = dest
    return out


@pytest.mark.parametrize("quantization", ["none", "int8"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_validates(kind, quantization, saved, tmp_path):
    result = load([f"checkpoint.path={saved[kind]}", f"quantization={quantization}"], run_dir=tmp_path / "run")
    r = result.report
    assert r["status"] == "ok", r["error"]
    assert [(s["name"], s["status"]) for s in r["stages"]] == [(s, "ok") for s in STAGES]
    v = r["validation"]
    assert v["checks"]["forward_finite"] is True  # every kind here gets inputs the model accepts
    assert all(v["checks"].values()), v["failures"]
    assert set(v["skipped"]) <= set(METRICS) and all(isinstance(w, str) and w for w in v["skipped"].values())
    causal = kind == "llama"
    assert v["skipped"].get("perplexity") == (
        "the checkpoint directory has no tokenizer" if causal else f"{type(result.model).__name__} is not a causal LM"
    )
    m = v["metrics"]
    assert ("forward_tokens_per_s" in m) == (result.model.main_input_name == "input_ids")
    if quantization == "int8":
        assert r["quantization"]["quantized"] > 0
        assert m["reference"].startswith("unquantized") and 0 < m["logits_rel_error"] < 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_inputs_follow_main_input_name_and_config(kind, saved):
    """The inputs validate builds are what the model declares, and transformers' own model accepts them."""
    cls, _ = _kinds()[kind]
    model = cls.from_pretrained(saved[kind], local_files_only=True).eval()
    inputs = build_inputs(model, torch.device("cpu"))
    kwargs, config = inputs.kwargs, model.config
    assert next(iter(kwargs)) == model.main_input_name
    main = kwargs[model.main_input_name]
    if model.main_input_name == "pixel_values":
        assert main.shape == (1, config.num_channels, config.image_size, config.image_size)
    elif model.main_input_name == "input_features":
        assert main.shape == (1, config.num_mel_bins, config.max_source_positions * 2)  # Whisper's conv stride 2
    elif model.main_input_name == "input_values":
        assert main.shape == (1, 16000) and main.dtype == torch.float32  # one second of 16 kHz audio
    else:
        assert main.dtype == torch.long and int(main.max()) < config.vocab_size
    assert ("decoder_input_ids" in kwargs) == bool(config.is_encoder_decoder)
    with torch.inference_mode():
        out = model(**kwargs)
    assert torch.isfinite(out[0]).all()


def test_a_model_without_buildable_inputs_skips_with_its_reason(tmp_path):
    """PatchTST takes `past_values` (time series): no inputs are built, the checks that need them say why."""
    torch.manual_seed(0)
    config = T.PatchTSTConfig(
        num_input_channels=2, context_length=32, patch_length=8, patch_stride=8, d_model=16, num_attention_heads=2
    )
    T.PatchTSTModel(config).save_pretrained(tmp_path / "ck")
    result = load([f"checkpoint.path={tmp_path / 'ck'}", "quantization=none"], run_dir=tmp_path / "run")
    v = result.report["validation"]
    assert result.report["status"] == "ok"
    assert "forward_finite" not in v["checks"] and all(v["checks"].values())
    assert v["skipped"]["forward_finite"] == "PatchTSTModel takes 'past_values': no fixed inputs are built for it"


def test_vit_classifier_int8_cli_exit_0(saved, tmp_path):
    p = run_cli(f"checkpoint.path={saved['vit_classifier']}", "quantization=int8", f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped" in p.stdout and "not a causal LM" in p.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "ok" and report["validation"]["checks"]["forward_finite"] is True


@pytest.mark.parametrize(
    "kind, expected", [("t5", T.T5ForConditionalGeneration), ("whisper", T.WhisperForConditionalGeneration)]
)
def test_encoder_decoder_without_architectures_gets_its_generating_head(kind, expected, saved, tmp_path):
    ck = tmp_path / kind
    shutil.copytree(saved[kind], ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.pop("architectures")
    (ck / "config.json").write_text(json.dumps(cfg))
    result = load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    assert result.report["status"] == "ok", result.report["error"]
    assert type(result.model) is expected
