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


# ---------------------------------------------------------------- one small Llama: the call paths of the patch


def small_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)  # fmt: skip
    config.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_items_in_batch=torch.tensor(5)),
        dict(num_items_in_batch=3),
        dict(ignore_index=7),
        "shift_labels",
    ],
    ids=["num_items_tensor", "num_items_int", "ignore_index", "shift_labels"],
)
def test_loss_kwargs_like_stock(kwargs):
    model = small_llama()
    ids, mask, labels = batch()
    if kwargs == "shift_labels":  # given as is, not shifted again: stock needs labels too to compute a loss
        shift = labels.roll(-1, 1)
        shift[:, -1] = -100
        kwargs = dict(shift_labels=shift)
    if "ignore_index" in kwargs:  # the ignored positions carry that index (and so do real 7s)
        labels = labels.masked_fill(labels == -100, kwargs["ignore_index"])
    ref, ref_grads = loss_and_grads(model, ids, mask, labels, **kwargs)
    hf.patch(model)
    out, grads = loss_and_grads(model, ids, mask, labels, **kwargs)
    assert out.logits is None
    assert_same(out.loss, ref.loss, grads, ref_grads)


def test_eval_generation_and_unpatch_are_stock():
    model = small_llama()
    ids, mask, labels = batch()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels)
        hf.patch(model)
        assert hf.is_patched(model) and "forward" in vars(model)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)  # eval: the stock forward, logits and all
        assert out.logits is not None and torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
        last = model(ids, attention_mask=mask, logits_to_keep=1)  # positional input_ids, logits_to_keep
        assert last.logits.shape == (2, 1, VOCAB)
        model.train()
        with pytest.raises(ValueError, match="batch_size"):  # logits asked for: stock (which fails), in training too
            model(input_ids=ids, labels=labels, logits_to_keep=1)
        hf.unpatch(model)
    assert not hf.is_patched(model) and "forward" not in vars(model)
    assert model.forward.__func__ is type(model).forward
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(model)


def test_fused_option_and_return_dict():
    model = small_llama()
    ids, mask, labels = batch()
    model.eval()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    hf.patch(model, fused=True)  # labels in eval mode: fused too
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and rel_err(out.loss, ref.loss) <= TOL
    as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and rel_err(as_tuple[0], ref.loss) <= TOL
    hf.patch(model, fused=False)  # patching again replaces the options
    assert model(input_ids=ids, labels=labels).logits is not None
    model.train()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_options_reach_linear_cross_entropy():
    model = small_llama()
    ids, mask, labels = batch()
    hf.patch(model, impl="reference", z_loss=1e-2, label_smoothing=0.1)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    hf.unpatch(model)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden)[:, :-1].reshape(-1, VOCAB)
        target = labels[:, 1:].reshape(-1)
        valid = target != -100
        lse = logits.logsumexp(-1)[valid]
        want = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1) + 1e-2 * lse.square().mean()
    assert rel_err(out.loss, want) <= TOL


def test_grpo_step_with_log_probs_without_logits():
    """A GRPO-style step on hf.log_probs (linear_log_probs on the decoder's hidden states and lm_head): log-probs,
    entropy and every parameter's gradient of a clipped objective as from the stock logits; the head runs on zero
    positions."""
    model = small_llama()
    model.train()
    ids, mask, labels = batch()
    advantages = torch.tensor([0.8, -1.3])
    temperature, clip, beta = 0.7, 0.2, 0.01

    def objective(logp, entropy, old):
        valid = (torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:] != -100).float()
        ratio = torch.exp(logp - old)
        clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
        per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None]) - beta * entropy
        return (per_token * valid).sum() / valid.sum()

    # stock: the full logits
    logits = model(input_ids=ids, attention_mask=mask).logits.float() / temperature
    log_p = torch.log_softmax(logits[:, :-1], -1)
    target = labels[:, 1:]
    picked = log_p.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    ref_logp = torch.nn.functional.pad(torch.where(target != -100, picked, 0.0), (0, 1))
    ref_ent = torch.nn.functional.pad(torch.where(target != -100, -(log_p.exp() * log_p).sum(-1), 0.0), (0, 1))
    old = (ref_logp.detach() - 0.1 * torch.arange(7.0)).clone()  # a policy one step behind
    objective(ref_logp, ref_ent, old).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    hf.patch(model, impl="cpu")
    head_positions = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: head_positions.append(out.shape[-2]))
    try:
        logp, ent = hf.log_probs(model, ids, labels, attention_mask=mask, temperature=temperature, return_entropy=True)
    finally:
        hook.remove()
    assert head_positions == [0], head_positions  # the stock head ran on no position: no logits
    assert logp.shape == ids.shape and ent.shape == ids.shape
    assert rel_err(logp, ref_logp) <= TOL and rel_err(ent, ref_ent) <= TOL
    objective(logp, ent, old).backward()
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[n]) <= 1e-5, n
    hf.unpatch(model)
    with pytest.raises(ValueError, match="needs a patched model"):
        hf.log_probs(model, ids, labels)


def test_bad_input():
    model = small_llama()
    with pytest.raises(TypeError, match="unknown options"):
        hf.patch(model, chunksize=4)
    with pytest.raises(TypeError, match="fused must be"):
        hf.patch(model, fused="yes")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.patch(torch.nn.Linear(2, 2))
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        hf.patch(model)
    assert not hf.is_patched(model)


# ---------------------------------------------------------------- Trainer with gradient accumulation


def _trainer_run(model, tmp_path):
    from transformers import Trainer, TrainingArguments

    losses = []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            loss = super().compute_loss(model, inputs, **kwargs)
            losses.append(loss.detach().clone())
            return loss

    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(16):  # a different number of valid labels in every row: num_items_in_batch matters
        ids = torch.randint(3, VOCAB, (9,), generator=g)
        n = 3 + i % 6
        mask = (torch.arange(9) < n).long()
        labels = torch.where(mask.bool(), ids, -100)
        rows.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=2,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    Recording(model=model, args=args, train_dataset=rows).train()
    updates = {n: p.detach() - initial[n] for n, p in model.named_parameters()}
    return torch.stack(losses), updates


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_trainer_gradient_accumulation(accepts_loss_kwargs, tmp_path):
    """Two SGD steps of 4 accumulated micro-batches, stock vs patched: same losses, same weight updates."""
    import copy

    stock = small_llama()
    if not accepts_loss_kwargs:  # as the families that set it on their class (Qwen2.5-VL, GLM-4V, ...)
        stock.accepts_loss_kwargs = False
    patched = hf.patch(copy.deepcopy(stock))
    ref_losses, ref_updates = _trainer_run(stock, tmp_path / "stock")
    losses, updates = _trainer_run(patched, tmp_path / "patched")
    assert ref_losses.numel() == 8
    assert rel_err(losses, ref_losses) <= TOL, f"{losses.tolist()} vs {ref_losses.tolist()}"
    for name, ref in ref_updates.items():
        assert rel_err(updates[name], ref) <= TOL, f"{name}: update relative error {rel_err(updates[name], ref):.2e}"


# ---------------------------------------------------------------- PEFT on the head


def _peft_pair(**lora):
    import copy

    peft = pytest.importorskip("peft")
    stock = peft.get_peft_model(small_llama(), peft.LoraConfig(**lora))
    torch.manual_seed(5)
    for name, p in stock.named_parameters():
        if "lora_B" in name:  # B starts at zero: a random B makes the gradient of A non-zero
            p.data.normal_(0, 0.1)
    patched = copy.deepcopy(stock)
    assert hf.patch(patched) is patched
    return stock, patched


def _trainable_grads(model, ids, mask, labels):
    out, grads = loss_and_grads(model, ids, mask, labels)
    return out, {n: g for n, g in grads.items() if dict(model.named_parameters())[n].requires_grad}


def test_peft_lora_on_head():
    stock, patched = _peft_pair(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], lora_dropout=0.0)
    ids, mask, labels = batch()
    ref, ref_grads = _trainable_grads(stock, ids, mask, labels)
    out, grads = _trainable_grads(patched, ids, mask, labels)
    assert out.logits is None
    head = [n for n in ref_grads if "lm_head.lora_" in n]
    assert len(head) == 2 and all(ref_grads[n].abs().sum() > 0 for n in head)
    assert_same(out.loss, ref.loss, grads, ref_grads)


def test_peft_modules_to_save_head():
    stock, patched = _peft_pair(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ids, mask, labels = batch()
    ref, ref_grads = _trainable_grads(stock, ids, mask, labels)
    out, grads = _trainable_grads(patched, ids, mask, labels)
    assert any("modules_to_save" in n and "lm_head" in n for n in ref_grads)
    assert out.logits is None
    assert_same(out.loss, ref.loss, grads, ref_grads)
    with torch.no_grad(), patched.disable_adapter(), stock.disable_adapter():  # the original head (frozen)
        ref = _stock_loss(stock, ids, mask, labels)
        out = _stock_loss(patched, ids, mask, labels)
    assert out.logits is None and rel_err(out.loss, ref.loss) <= TOL


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_peft_other_adapters_on_head_refused(kind):
    peft = pytest.importorskip("peft")
    if kind == "dora":
        config = peft.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True)
    else:
        config = peft.IA3Config(target_modules=["lm_head", "down_proj"], feedforward_modules=["down_proj"])
    model = peft.get_peft_model(small_llama(), config)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        hf.patch(model)


# ---------------------------------------------------------------- torch.compile


def test_compile_adds_no_graph_break():
    model = small_llama()
    ids, mask, labels = batch()
    counts = {}
    for name in ("stock", "patched"):
        if name == "patched":
            hf.patch(model)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
        counts[name] = explained.graph_break_count
    assert counts["patched"] <= counts["stock"], counts
    torch._dynamo.reset()
    ref, ref_grads = loss_and_grads(hf.unpatch(model), ids, mask, labels)
    hf.patch(model)
    compiled = torch.compile(model, backend="eager")
    out, grads = loss_and_grads(compiled, ids, mask, labels)
    assert out.logits is None
    assert_same(out.loss, ref.loss, {n.removeprefix("_orig_mod."): g for n, g in grads.items()}, ref_grads)
