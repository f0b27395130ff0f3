"""The local training backend: Tinker's loss semantics computed exactly, learning, and
crash-resume down to the optimizer state, on a tiny random Llama built per test module.

One test trains the real converted SmolLM2 when its cache exists (``REEF_TEST_DATA_DIR``
or ``var``) and prints the step time; it is skipped otherwise.
"""

from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from services.trainer.backend import Checkpoint, Datum
from services.trainer.local import CheckpointError, LocalBackend, micro_batches
from services.trainer.losses import UnknownLossError
from services.trainer.samples import Sample, to_datums
from shared.settings import Settings

VOCAB = 64
PROMPT = [1, 5, 9, 14, 3]
COMPLETION = [22, 7, 40, 41, 2]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a Hugging Face directory."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"profile": "dev", "lora_rank": 4, "lora_alpha": 8,
                              "ppo_clip": 0.2, **overrides}
    return Settings(**values)


def backend(base_dir: Path, state_dir: Path, **kwargs: Any) -> LocalBackend:
    b = LocalBackend(settings(), base_dir, state_dir, **kwargs)
    b.start()
    return b


def perturb(b: LocalBackend, seed: int = 7) -> None:
    """Give LoRA B non-zero values, so the adapter changes the logits (fresh LoRA is a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def hand_logprobs(model: Any, tokens: list[int]) -> torch.Tensor:
    """Target logprobs from the full logits, the textbook way (log_softmax then gather)."""
    logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def datum(advantage: float | list[float], logprobs: list[float] | None = None,
          completion: list[int] = COMPLETION) -> Datum:
    lps = logprobs if logprobs is not None else [-1.0] * len(completion)
    return Datum.from_sample(PROMPT, completion, lps, advantage)


def current(b: LocalBackend, d: Datum) -> Datum:
    """``d`` with its sampler logprobs set to the current policy's (ratio exactly 1)."""
    lps = b.logprobs([d])[0]
    start = len(PROMPT) - 1
    return Datum.from_sample(PROMPT, d.tokens[len(PROMPT):], lps[start:],
                             d.advantages[start:])


def lora_grads(b: LocalBackend) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}


def lora_weights(b: LocalBackend) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in b.model.named_parameters() if p.requires_grad}


@pytest.fixture
def trained(base_dir: Path, tmp_path: Path) -> LocalBackend:
    b = backend(base_dir, tmp_path / "state")
    perturb(b)
    return b


# --- losses ---------------------------------------------------------------------------------


def test_logprobs_match_a_full_log_softmax(trained: LocalBackend) -> None:
    d = datum(1.0)
    got = torch.tensor(trained.logprobs([d])[0])
    with torch.no_grad():
        expected = hand_logprobs(trained.model, d.tokens)
    assert got.shape == (len(d.tokens) - 1,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_base_logprobs_switch_the_adapter_off(base_dir: Path, tmp_path: Path) -> None:
    b = backend(base_dir, tmp_path / "state")
    d = datum(1.0)
    assert b.base_logprobs([d]) == b.logprobs([d])  # a fresh LoRA changes nothing
    perturb(b)
    with torch.no_grad(), b.model.disable_adapter():
        expected = hand_logprobs(b.model, d.tokens)
    torch.testing.assert_close(torch.tensor(b.base_logprobs([d])[0]), expected,
                               rtol=1e-5, atol=1e-5)
    assert b.base_logprobs([d]) != b.logprobs([d])
    assert b.logprobs([d]) == b.logprobs([d])  # the adapter is back on afterwards


def test_logprobs_of_padded_batch_equal_one_by_one(trained: LocalBackend) -> None:
    short, long = datum(1.0, completion=[4, 2]), datum(1.0)
    together = trained.logprobs([short, long])
    alone = [trained.logprobs([short])[0], trained.logprobs([long])[0]]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)


def test_importance_sampling_at_ratio_one_is_minus_sum_of_advantages(
        trained: LocalBackend) -> None:
    advantages = [0.5, -1.0, 2.0, 0.25, 1.5]
    d = current(trained, datum(advantages))
    loss = trained.forward_backward([d], "importance_sampling")
    assert loss == pytest.approx(-sum(advantages), abs=1e-4)


@pytest.mark.parametrize("loss_fn", ["tis", "importance_sampling", "ppo", "cispo",
                                     "cross_entropy"])
def test_loss_and_gradient_equal_a_hand_computation(trained: LocalBackend, loss_fn: str) -> None:
    advantages = [1.0, -0.5, 2.0, 0.75, -1.5]
    sampler = [-0.2, -3.0, -6.0, -4.5, -0.1]  # far from the policy: ratios well outside 1 +- 0.2
    d = datum(advantages, sampler)
    loss = trained.forward_backward([d], loss_fn)
    got = lora_grads(trained)
    trained.model.zero_grad(set_to_none=True)

    start = len(PROMPT) - 1
    lp = hand_logprobs(trained.model, d.tokens)[start:]
    old, adv = torch.tensor(sampler), torch.tensor(advantages)
    ratio = torch.exp(lp - old)
    low, high = 0.8, 1.2
    expected = {
        "tis": lambda: -(ratio.detach().clamp(max=2.0) * lp * adv).sum(),  # tis_cap 2
        "importance_sampling": lambda: -(ratio * adv).sum(),
        "ppo": lambda: -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv).sum(),
        "cispo": lambda: -(ratio.detach().clamp(low, high) * lp * adv).sum(),
        "cross_entropy": lambda: -(lp * adv).sum(),
    }[loss_fn]()
    expected.backward()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-5)
    want = lora_grads(trained)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_ppo_clipping_engages_when_sampler_logprobs_are_far_off(trained: LocalBackend) -> None:
    d = current(trained, datum(1.0))
    near = trained.forward_backward([d], "ppo")
    result = trained.optim_step(0.0)
    assert near == pytest.approx(-5.0, abs=1e-4)
    assert result.metrics["clip_fraction"] == 0.0
    assert result.metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)

    far = Datum(d.tokens, [lp - 3.0 if a else 0.0 for lp, a in zip(
        d.logprobs, d.advantages, strict=True)], d.advantages)  # ratio e^3 on every token
    loss = trained.forward_backward([far], "ppo")
    assert loss == pytest.approx(-5 * 1.2, abs=1e-4)  # positive advantages: clipped at 1 + eps
    assert all(g.abs().max() == 0 for g in lora_grads(trained).values())  # no gradient
    result = trained.optim_step(0.0)
    assert result.metrics["clip_fraction"] == 1.0


def test_cispo_keeps_a_gradient_where_ppo_clips(trained: LocalBackend) -> None:
    d = current(trained, datum(1.0))
    far = Datum(d.tokens, [lp - 3.0 if a else 0.0 for lp, a in zip(
        d.logprobs, d.advantages, strict=True)], d.advantages)
    trained.forward_backward([far], "cispo")
    cispo = lora_grads(trained)
    trained.optim_step(0.0)
    trained.forward_backward([d], "cross_entropy")  # same tokens, weight 1 instead of 1.2
    ce = lora_grads(trained)
    for name in ce:
        torch.testing.assert_close(cispo[name], 1.2 * ce[name], rtol=1e-4, atol=1e-7)


def shifted(d: Datum, by: float) -> Datum:
    """``d`` with every completion logprob of the sampler moved by ``by`` (ratio e^-by)."""
    return Datum(d.tokens, [lp + by if a else 0.0 for lp, a in zip(
        d.logprobs, d.advantages, strict=True)], d.advantages)


def test_tis_truncates_large_weights_at_the_cap(trained: LocalBackend) -> None:
    d = current(trained, datum(1.0))
    far = shifted(d, -3.0)  # ratio e^3 = 20.1 on every token, above the cap 2
    loss = trained.forward_backward([far], "tis")
    tis = lora_grads(trained)
    result = trained.optim_step(0.0)
    lp = sum(d.logprobs)  # the current policy's logprobs (ratio 1 in d)
    assert loss == pytest.approx(-2.0 * lp, rel=1e-4)  # -sum(min(20.1, 2) * lp * 1)
    assert result.metrics["clip_fraction"] == 1.0  # every weight truncated
    assert result.metrics["ratio_mean"] == pytest.approx(math.exp(3.0), rel=1e-4)
    trained.forward_backward([d], "cross_entropy")
    ce = lora_grads(trained)
    for name in ce:  # the gradient of a weight-2 likelihood
        torch.testing.assert_close(tis[name], 2.0 * ce[name], rtol=1e-4, atol=1e-7)


def test_tis_below_the_cap_is_the_unbiased_importance_sampling_gradient(
        trained: LocalBackend) -> None:
    d = shifted(current(trained, datum([1.0, -0.5, 2.0, 0.75, -1.5])), 1.0)  # ratio e^-1
    loss = trained.forward_backward([d], "tis")
    tis = lora_grads(trained)
    assert trained.optim_step(0.0).metrics["clip_fraction"] == 0.0
    is_loss = trained.forward_backward([d], "importance_sampling")
    unbiased = lora_grads(trained)
    # -(e^-1 * sum(A)) for IS; TIS's loss value differs (-e^-1 * sum(lp * A)), not its gradient
    assert is_loss == pytest.approx(-math.exp(-1.0) * 1.75, rel=1e-4)  # sum(A) = 1.75
    assert loss != pytest.approx(is_loss)
    for name in unbiased:
        torch.testing.assert_close(tis[name], unbiased[name], rtol=1e-4, atol=1e-7)


def test_prompt_positions_with_zero_advantage_change_nothing(trained: LocalBackend) -> None:
    d = datum(1.0)
    junk = [-9.0] * (len(PROMPT) - 1)  # prompt logprobs are ignored where advantage is 0
    noisy = Datum(d.tokens, [*junk, *d.logprobs[len(junk):]], d.advantages)
    for loss_fn in ("tis", "importance_sampling", "ppo", "cispo", "cross_entropy"):
        a = trained.forward_backward([d], loss_fn)
        ga = lora_grads(trained)
        trained.model.zero_grad(set_to_none=True)
        b = trained.forward_backward([noisy], loss_fn)
        gb = lora_grads(trained)
        trained.model.zero_grad(set_to_none=True)
        assert a == b
        assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_all_zero_advantages_skip_the_model(trained: LocalBackend) -> None:
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handle = trained.model.register_forward_hook(count)
    try:
        assert trained.forward_backward([datum(0.0), datum(0.0)], "ppo") == 0.0
    finally:
        handle.remove()
    assert calls == 0
    assert trained.optim_step(1e-3).metrics["tokens"] == 0.0


def test_losses_are_summed_not_averaged(trained: LocalBackend) -> None:
    d = datum([1.0, -0.5, 2.0, 0.75, -1.5], [-0.2, -3.0, -6.0, -4.5, -0.1])
    one = trained.forward_backward([d], "ppo")
    g1 = lora_grads(trained)
    trained.model.zero_grad(set_to_none=True)
    two = trained.forward_backward([d, d], "ppo")
    g2 = lora_grads(trained)
    assert two == pytest.approx(2 * one, rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g2[name], 2 * g1[name], rtol=1e-4, atol=1e-7)
    # the step reports every forward_backward since the last step
    assert trained.optim_step(1e-3).loss == pytest.approx(one + two, rel=1e-6)


@pytest.mark.parametrize(("mode", "expected"), [
    ("token_mean", -(1.0 + -0.5) / 2),  # each answer's advantage once, over 2 samples
    ("sequence_sum", -(5 * 1.0 + 2 * -0.5) / 2),  # each token's: 5 and 2 tokens
])
def test_the_summed_loss_is_the_normalised_one(trained: LocalBackend, mode: str,
                                              expected: float) -> None:
    long, short = current(trained, datum(1.0)), current(trained, datum(1.0, completion=[4, 2]))
    start = len(PROMPT) - 1
    samples = [Sample(turn_id=str(i), prompt=PROMPT, completion=d.tokens[len(PROMPT):],
                      logprobs=d.logprobs[start:], reward=0.0, version=0, group=str(i))
               for i, d in enumerate((long, short))]
    loss = trained.forward_backward(to_datums(samples, [1.0, -0.5], mode), "importance_sampling")
    assert loss == pytest.approx(expected, abs=1e-5)  # ratio 1: -sum of scaled advantages


def test_micro_batches_change_nothing_but_memory(base_dir: Path, tmp_path: Path) -> None:
    data = [datum([0.5 * i - 1, 1.0, -1.0, 0.5, 2.0], [-0.5, -2.0, -1.0, -3.0, -0.7])
            for i in range(5)]
    results = []
    for tokens in (10_000, 9):  # all at once, then one datum per pass
        b = backend(base_dir, tmp_path / str(tokens), micro_batch_tokens=tokens)
        perturb(b)
        results.append((b.forward_backward(data, "cispo"), lora_grads(b)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_micro_batches_respect_the_token_budget() -> None:
    data = [datum(1.0, completion=[3] * n) for n in (2, 2, 10, 3, 40)]
    groups = list(micro_batches(data, 30))
    assert [len(g) for g in groups] == [2, 2, 1]  # 2x6, then 14+7 (2x14), then 44
    assert [d for g in groups for d in g] == data


def test_unknown_loss_is_refused(trained: LocalBackend) -> None:
    with pytest.raises(UnknownLossError, match="cispo"):
        trained.forward_backward([datum(1.0)], "dpo")


# --- gradient-norm clipping -----------------------------------------------------------------


@pytest.mark.parametrize("limit", [0.05, 0.0, 1e6])
def test_the_gradient_norm_is_clipped_before_the_step_and_reported_unclipped(
        base_dir: Path, tmp_path: Path, limit: float) -> None:
    """Defect: no gradient clipping (one stale token's huge ratio moved the whole step)."""
    b = LocalBackend(settings(max_grad_norm=limit), base_dir, tmp_path / "state")
    b.start()
    perturb(b)
    b.forward_backward([datum([1.0, -0.5, 2.0, 0.75, -1.5], [-0.2, -3.0, -6.0, -4.5, -0.1])],
                       "importance_sampling")
    grads = lora_grads(b)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    result = b.optim_step(1e-3)
    assert norm > 0.05
    assert result.metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)  # before clipping
    clipped = 0 < limit < norm
    assert result.metrics["grad_clipped"] == float(clipped)
    scale = limit / (norm + 1e-6) if clipped else 1.0  # torch's clip_grad_norm_ coefficient
    # AdamW's first moment after one step is (1 - beta1) times the gradient it was given.
    params = dict(b.model.named_parameters())
    state = b._require_optimizer().state
    for name, grad in grads.items():
        torch.testing.assert_close(state[params[name]]["exp_avg"], 0.1 * scale * grad,
                                   rtol=1e-4, atol=1e-9)


# --- learning -------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling"])
def test_a_few_steps_raise_the_logprob_of_the_target(base_dir: Path, tmp_path: Path,
                                                     loss_fn: str) -> None:
    b = backend(base_dir, tmp_path / "state")
    d = datum(1.0)
    start = len(PROMPT) - 1
    before = sum(b.logprobs([d])[0][start:])
    for _ in range(5):
        b.forward_backward([current(b, d)], loss_fn)
        result = b.optim_step(1e-2)
    after = sum(b.logprobs([d])[0][start:])
    assert result.step == 5 and result.metrics["grad_norm"] > 0
    assert after > before + 1.0, (before, after)


# --- checkpoints ----------------------------------------------------------------------------


def train_steps(b: LocalBackend, steps: int) -> None:
    data = [datum([1.0, -0.5, 2.0, 0.75, -1.5], [-0.2, -3.0, -6.0, -4.5, -0.1]),
            datum(-1.0, completion=[8, 9, 10])]
    for _ in range(steps):
        b.forward_backward(data, "ppo")
        b.optim_step(1e-2)


def test_resume_restores_weights_optimizer_step_and_next_step_exactly(
        base_dir: Path, tmp_path: Path) -> None:
    uninterrupted = backend(base_dir, tmp_path / "a")
    train_steps(uninterrupted, 3)

    first = backend(base_dir, tmp_path / "b")
    train_steps(first, 2)
    saved = first.save("step-2")
    rng_at_save = torch.get_rng_state()
    torch.rand(10)  # the RNG moves on in the crashed process...
    resumed = LocalBackend(settings(), base_dir, tmp_path / "b")
    assert resumed.start() == saved
    assert torch.equal(torch.get_rng_state(), rng_at_save)  # ...and is restored
    assert resumed.step == 2
    assert all(torch.equal(w, lora_weights(first)[n]) for n, w in lora_weights(resumed).items())
    opt_a, opt_b = first._require_optimizer(), resumed._require_optimizer()
    for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"],
                      strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])

    train_steps(resumed, 1)
    assert resumed.step == 3
    final_a, final_b = lora_weights(uninterrupted), lora_weights(resumed)
    assert all(torch.equal(final_a[n], final_b[n]) for n in final_a)


def test_start_without_checkpoint_returns_none(base_dir: Path, tmp_path: Path) -> None:
    b = LocalBackend(settings(), base_dir, tmp_path / "empty")
    assert b.start() is None
    assert b.step == 0


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(
        base_dir: Path, tmp_path: Path) -> None:
    b = backend(base_dir, tmp_path / "state")
    train_steps(b, 2)
    checkpoint = b.save("v1")
    adapter = Path(checkpoint.adapter_path)
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    served = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[*PROMPT, *COMPLETION]])
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, b.model(input_ids=ids).logits,
                                   rtol=0, atol=0)


def lora_state(b: LocalBackend) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in b.model.named_parameters() if p.requires_grad}


def test_restore_goes_back_to_a_checkpoint_and_drops_pending_gradients(
        base_dir: Path, tmp_path: Path) -> None:
    """After a refused candidate or a failed step the trainer restores the live state: the
    weights, AdamW state and step are the checkpoint's, and a half step (gradients
    accumulated, no optimizer step) leaves nothing behind."""
    b = backend(base_dir, tmp_path / "state")
    train_steps(b, 2)
    live = b.save("live")
    kept = lora_state(b)
    train_steps(b, 2)  # a candidate ...
    b.forward_backward([datum([1.0] * 5, [-1.0] * 5)], "ppo")  # ... and a half step
    b.restore(live)
    assert b.step == 2
    for name, value in lora_state(b).items():
        torch.testing.assert_close(value, kept[name], rtol=0, atol=0)
    assert all(p.grad is None for p in b.model.parameters())
    twin = backend(base_dir, tmp_path / "twin")  # the same two steps from the same state
    train_steps(twin, 2)
    train_steps(b, 1)
    train_steps(twin, 1)
    for name, value in lora_state(b).items():
        torch.testing.assert_close(value, lora_state(twin)[name], rtol=0, atol=0)


def test_checkpoints_stay_until_deleted(base_dir: Path, tmp_path: Path) -> None:
    b = backend(base_dir, tmp_path / "state")
    saved = []
    for step in range(1, 6):
        train_steps(b, 1)
        saved.append(b.save(f"v{step:06d}"))
    assert [c.step for c in b.checkpoints()] == [1, 2, 3, 4, 5]  # no pruning of its own
    b.delete(saved[1])
    b.delete(saved[1])  # already gone: fine
    assert [Path(c.state_path).name for c in b.checkpoints()] == [
        "v000001", "v000003", "v000004", "v000005"]
    outside = Checkpoint(step=1, state_path=str(tmp_path / "elsewhere"), adapter_path="")
    with pytest.raises(CheckpointError):
        b.delete(outside)


def test_save_replaces_a_same_named_checkpoint_and_ignores_partial_ones(
        base_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    b = backend(base_dir, state)
    b.save("latest")
    train_steps(b, 1)
    b.save("latest")
    (state / ".tmp-crashed-123").mkdir()  # a save interrupted by a crash
    resumed = LocalBackend(settings(), base_dir, state)
    checkpoint = resumed.start()
    assert checkpoint is not None and checkpoint.step == 1
    assert sorted(p.name for p in state.iterdir()) == ["latest"]


def test_resume_with_another_lora_config_is_refused(base_dir: Path, tmp_path: Path) -> None:
    backend(base_dir, tmp_path / "state").save("s")
    other = LocalBackend(settings(lora_rank=8), base_dir, tmp_path / "state")
    with pytest.raises(RuntimeError, match="LoRA"):
        other.start()


def test_bad_checkpoint_names_are_refused(trained: LocalBackend) -> None:
    for name in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="checkpoint name"):
            trained.save(name)


# --- the real model -------------------------------------------------------------------------


def smollm2_dir() -> Path | None:
    roots = [os.environ.get("REEF_TEST_DATA_DIR"), "var"]
    repo = Path(__file__).resolve().parent.parent
    for root in filter(None, roots):
        path = repo / root / "models" / "SmolLM2-135M-Instruct"
        if (path / "config.json").is_file():
            return path
    return None


@pytest.mark.slow
def test_smollm2_lora_step_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = smollm2_dir()
    if path is None:
        pytest.skip("no converted SmolLM2 (run the policy tests with REEF_TEST_DATA_DIR)")
    b = LocalBackend(settings(lora_rank=8, lora_alpha=16), path, tmp_path / "state")
    b.start()
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(16):  # 16 datums of ~80 tokens: 32 prompt, 48 completion
        tokens = torch.randint(100, 49_000, (80,), generator=gen).tolist()
        data.append(Datum.from_sample(tokens[:32], tokens[32:], [-2.0] * 48,
                                      float(torch.randn(1, generator=gen))))
    times = []
    for _ in range(2):  # the first step warms up
        started = time.perf_counter()
        b.forward_backward(data, "ppo")
        result = b.optim_step(5e-4)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    b.save("bench")
    save_s = time.perf_counter() - started
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    with capsys.disabled():
        print(f"\nSmolLM2 LoRA r=8, 16x80 tokens, ppo: steps {[f'{t:.2f}' for t in times]} s, "
              f"save {save_s:.2f} s, peak RSS {rss_gb:.2f} GB, threads {torch.get_num_threads()}")
    assert result.step == 2 and result.metrics["tokens"] == 16 * 48
