"""infofuse.hf: every causal-LM family transformers builds offline, stock forward vs patched, float32."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import PretrainedConfig  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from infofuse import hf  # noqa: E402
from tests.utils import describe_mismatch, rel_err  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 99
TOL = 1e-5  # relative error of the loss and of every parameter gradient, float32

# One shrinker for every family: each of these that the family's config has is passed to its constructor (so that
# derived fields — layer types, head dims — follow), and the same for each sub-config.
TINY = dict(
    hidden_size=32, n_embd=32, d_model=32, dim=32, embed_dim=32, n_embed=32, emb_dim=32, model_dim=32,
    num_hidden_layers=2, n_layer=2, n_layers=2, num_layers=2, decoder_layers=2, encoder_layers=2,
    num_attention_heads=2, n_head=2, n_heads=2, num_heads=2, decoder_attention_heads=2, encoder_attention_heads=2,
    num_key_value_heads=1, n_kv_heads=1, num_kv_heads=1, head_dim=16,
    intermediate_size=64, n_inner=64, ffn_dim=64, decoder_ffn_dim=64, encoder_ffn_dim=64, d_ff=64,
    ffn_hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, top_k=2,
    num_experts_per_token=2, n_shared_experts=1, num_shared_experts=1, first_k_dense_replace=1, n_group=1,
    topk_group=1, moe_layer_freq=1,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=16, rotary_dim=8,
    attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    full_attention_interval=2, state_size=8, time_step_rank=4, expand=2, conv_kernel=4, mamba_d_state=8,
    mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_expand=2, ssm_state_size=8, n_groups=1, chunk_size=8,
    vocab_size=VOCAB, max_position_embeddings=64, n_positions=64, n_ctx=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    output_router_logits=True,  # MoE families: the auxiliary loss is part of the compared loss
)  # fmt: skip
MAX_PARAMS = 3_000_000


def _tiny_kwargs(config: PretrainedConfig, layers: int) -> dict:
    kw = {k: v for k, v in TINY.items() if hasattr(config, k)}
    for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers"):
        if k in kw:
            kw[k] = layers
    return kw


def tiny_config(model_type: str, layers: int = 2) -> PretrainedConfig:
    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    kw = _tiny_kwargs(default, layers)
    for name, sub in vars(default).items():
        if isinstance(sub, PretrainedConfig):
            kw[name] = type(sub)(**_tiny_kwargs(sub, layers)).to_dict()
    return config_class(**kw)


def tiny_model(model_type: str):
    """A float32 model of the family from a tiny config, or a pytest.skip saying why it cannot be built."""
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    errors = []
    for layers in (2, 4):  # 4: hybrid families whose layer pattern has no attention layer among 2
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = tiny_config(model_type, layers)
                with torch.device("meta"):
                    n = sum(p.numel() for p in model_class(config).parameters())
                if n > MAX_PARAMS:
                    raise RuntimeError(f"the shrunk config still has {n} parameters")
                torch.manual_seed(0)
                model = model_class(config).float()
                _stock_loss(model, *batch())  # the stock model must run on the batch
            return model
        except Exception as exc:  # noqa: BLE001 (any failure of the stock family to build is a skip reason)
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    pytest.skip(f"{model_type} does not build or run from a tiny config offline: {errors[-1]}")


def batch(b: int = 2, t: int = 7):
    """input_ids, attention_mask, labels: row 1 right-padded by 2, row 0 with ignored labels at 0 and 3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if b > 1:
        mask[1, -2:] = 0
        ids[1, -2:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, [0, 3]] = -100
    return ids, mask, labels


def _stock_loss(model, ids, mask, labels, **kwargs):
    model.train()
    torch.manual_seed(2)  # dropout: the same masks in both runs
    return model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)


def loss_and_grads(model, ids, mask, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = _stock_loss(model, ids, mask, labels, **kwargs)
    out.loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return out, grads


def assert_same(loss, ref_loss, grads, ref_grads, what=""):
    """Loss and each gradient within TOL relative error of the stock model's.

    A gradient that is zero in exact arithmetic (a key projection's bias, which softmax cancels) is rounding noise
    in both runs; its error is taken relative to max(‖stock gradient‖, 1e-3 · the RMS norm of all the gradients).
    """
    e = rel_err(loss, ref_loss)
    assert e <= TOL, f"{what}loss {loss.item():.9g} vs stock {ref_loss.item():.9g}: relative error {e:.2e}"
    assert grads.keys() == ref_grads.keys()
    norms = [g.double().norm() for g in ref_grads.values() if g is not None]
    floor = 1e-3 * (torch.stack(norms).square().mean().sqrt().item() if norms else 0.0)
    for name, ref in ref_grads.items():
        got = grads[name]
        assert (got is None) == (ref is None), f"{what}{name}: gradient {got is None=} vs stock {ref is None=}"
        if ref is not None:
            diff = (got.double() - ref.double()).norm().item()
            e = diff / max(ref.double().norm().item(), floor, 1e-30)
            assert e <= TOL, f"{what}{name}: gradient relative error {e:.2e}\n{describe_mismatch(got, ref, 0, 0)}"


FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_loss_and_gradients(model_type):
    model = tiny_model(model_type)
    if model_type in hf.REFUSED_FAMILIES:
        with pytest.raises(ValueError, match=type(model).__name__):
            hf.patch(model)
        return
    ids, mask, labels = batch()
    ref, ref_grads = loss_and_grads(model, ids, mask, labels)
    hf.patch(model)
    out, grads = loss_and_grads(model, ids, mask, labels)
    assert out.logits is None, "the patched forward must not return logits"
    assert type(out) is type(ref)
    assert_same(out.loss, ref.loss, grads, ref_grads)
    if getattr(ref, "aux_loss", None) is not None:
        assert rel_err(out.aux_loss, ref.aux_loss) <= TOL


@pytest.mark.parametrize("model_type", [f for f in FAMILIES if f not in hf.REFUSED_FAMILIES])
def test_family_generation(model_type):
    model = tiny_model(model_type)
    model.eval()
    ids, mask, _ = batch(1, 5)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        try:
            ref = model.generate(**kwargs)
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"stock generate() fails for {model_type}: {type(exc).__name__}: {str(exc)[:200]}")
        hf.patch(model)
        got = model.generate(**kwargs)
    assert torch.equal(got, ref), f"{got.tolist()} != {ref.tolist()}"
