"""Tests of the model-facing privacy audit (canaries, scoring, extraction, run_privacy_audit) on tiny models.

Oracles: transformers' own causal-LM loss (one sequence at a time) for log-perplexities, a slow argmax loop
without KV cache for greedy continuations, a recursive Levenshtein definition for the edit distance, and
training runs whose privacy is known by construction: a non-private run (σ = 0) that memorises its canaries
must be caught, and a DPTrainer run with its accounted ε must not be refuted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch

import vaultgemma_hf
from vaultgemma_hf.data.packing import DataCollatorForPackedSequences, pack_documents
from vaultgemma_hf.privacy_eval import (
    append_canaries,
    extraction_test,
    greedy_continuations,
    load_canaries,
    make_canaries,
    one_run_epsilon_lower_bound,
    run_privacy_audit,
    save_canaries,
    sequence_log_perplexity,
    token_edit_distance,
)
from vaultgemma_hf.trainer import DPTrainer, DPTrainingArguments

SPECIALS = (0, 1, 2, 3)


def tiny_model(tiny_kwargs, seed: int = 0, kind: str = "ours"):
    torch.manual_seed(seed)
    if kind == "transformers":  # the audit knows no model class: transformers' built-in VaultGemma works too
        import transformers

        return transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**tiny_kwargs()))
    model = vaultgemma_hf.VaultGemmaForCausalLM(vaultgemma_hf.VaultGemmaConfig(**tiny_kwargs()))
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


# ---------------------------------------------------------------------------------------------------- canaries


def test_canaries_are_random_tokens_with_fair_secret_coins(tmp_path):
    canary_set = make_canaries(2000, 97, length=8, excluded_token_ids=SPECIALS, bos_token_id=2, seed=1)
    tokens = np.array([c.token_ids for c in canary_set.canaries])
    assert (tokens[:, 0] == 2).all() and tokens.shape == (2000, 9)
    body = tokens[:, 1:]
    assert not np.isin(body, SPECIALS).any() and body.min() >= 4 and body.max() <= 96
    counts = np.bincount(body.ravel(), minlength=97)[4:]
    assert counts.min() > 0.6 * counts.mean()  # every allowed id is drawn (16,000 draws over 93 ids)
    included = sum(c.included for c in canary_set.canaries)
    assert abs(included - 1000) < 4 * math.sqrt(2000 * 0.25)  # Binomial(2000, 1/2) within 4 sd
    # Without a seed, two draws differ (OS entropy).
    a, b = make_canaries(64, 97, length=8), make_canaries(64, 97, length=8)
    assert [c.token_ids for c in a.canaries] != [c.token_ids for c in b.canaries]


def test_canary_file_round_trip_and_malformed_files(tmp_path):
    canary_set = make_canaries(10, 97, length=4, excluded_token_ids=SPECIALS, bos_token_id=2, seed=0)
    path = tmp_path / "canaries.jsonl"
    save_canaries(path, canary_set)
    assert load_canaries(path) == canary_set
    assert [p.name for p in tmp_path.iterdir()] == ["canaries.jsonl"]  # no temp file left

    lines = path.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    for text, message in [
        ("\n".join(lines[1:]), "not a canary file"),
        ("\n".join(lines[:3] + ["{"] + lines[4:]), r"bad.jsonl:4: not valid JSON"),
        ("\n".join(lines[:-1]), "announces 10 canaries, the file has 9"),
        ("\n".join(lines[:2] + [lines[2].replace('"included": ', '"included": 1, "x": ')] + lines[3:]), ":3:"),
        ("\n".join(lines[:2] + [json.dumps({"index": 1, "token_ids": [2, 5], "included": True})] + lines[3:]), ":3:"),
    ]:
        bad.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            load_canaries(bad)
    header = json.loads(lines[0])
    first = json.loads(lines[1])
    for record, message in [
        ({**first, "token_ids": [2, True, *first["token_ids"][2:]]}, ":2: expected token ids"),  # a bool is no id
        ({**first, "token_ids": [2, 0, *first["token_ids"][2:]]}, ":2: expected token ids"),  # an excluded id
        ({**first, "token_ids": [5, *first["token_ids"][1:]]}, ":2: canary length, BOS"),  # not the header's BOS
    ]:
        bad.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
        with pytest.raises(ValueError, match=message):
            load_canaries(bad)
    for key, value in [("vocab_size", None), ("length", "4"), ("excluded_token_ids", 3), ("num_canaries", 1.5)]:
        bad.write_text("\n".join([json.dumps({**header, key: value}), *lines[1:]]) + "\n")
        with pytest.raises(ValueError, match=f"malformed canary header: {key}"):
            load_canaries(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_canaries(tmp_path / "missing.jsonl")


def test_append_canaries_adds_each_included_canary_as_its_own_unit():
    canary_set = make_canaries(20, 97, length=6, excluded_token_ids=SPECIALS, bos_token_id=2, seed=3)
    docs = [[5, 6, 7, 8, 9]] * 4
    data = pack_documents(docs, seq_len=16, eos_token_id=1, pad_token_id=0)
    out = append_canaries(data, canary_set)
    included = canary_set.included
    assert len(out) == len(data) + len(included)
    for row, canary in zip(range(len(data), len(out)), included, strict=True):
        item = out[row]
        assert item["input_ids"][:7].tolist() == list(canary.token_ids)
        assert item["attention_mask"].sum() == 7 and (item["labels"][7:] == -100).all()
    # User-level DP: every canary is a user of its own.
    users = pack_documents(docs, seq_len=16, eos_token_id=1, user_ids=["a", "a", "b", "b"])
    grouped = append_canaries(users, canary_set)
    assert len(grouped.groups()) == 2 + len(included)
    with pytest.raises(ValueError, match="do not fit"):
        append_canaries(pack_documents(docs, seq_len=4, eos_token_id=1), canary_set)
    with pytest.raises(ValueError, match="collides"):
        append_canaries(
            pack_documents(docs, seq_len=16, eos_token_id=1, user_ids=[f"canary-{included[0].index}"] * 4), canary_set
        )


# ------------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("kind", ["ours", "transformers", "peft"])
def test_log_perplexity_matches_transformers_loss_one_sequence_at_a_time(tiny_kwargs, kind):
    model = tiny_model(tiny_kwargs, kind=kind)
    g = torch.Generator().manual_seed(0)
    sequences = [
        torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (11,), generator=g)
    ]
    ours = sequence_log_perplexity(model.train(), sequences, batch_size=4)  # batched with right padding
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        oracle = [model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss.item() for s in sequences]
    np.testing.assert_allclose(ours, oracle, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sequence_log_perplexity(model, [[5]])


@pytest.mark.parametrize("kind", ["ours", "transformers"])
def test_greedy_continuations_match_generate_ignore_eos_and_the_models_generation_config(tiny_kwargs, kind):
    from transformers import GenerationConfig

    model = tiny_model(tiny_kwargs, seed=1, kind=kind)
    with torch.no_grad():  # make EOS (id 1) the argmax after some prefixes, to check that generation goes on
        model.model.embed_tokens.weight[1] *= 20  # tied with the LM head
    prefixes = torch.randint(3, 97, (5, 7), generator=torch.Generator().manual_seed(2))
    ours = greedy_continuations(model, prefixes.tolist(), 12, batch_size=2)
    # Oracle: transformers' generate (KV cache) with a neutral greedy config and no EOS.
    oracle = model.generate(
        input_ids=prefixes,
        attention_mask=torch.ones_like(prefixes),
        generation_config=GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=[], pad_token_id=0),
    )[:, 7:].tolist()
    assert ours == oracle and all(len(o) == 12 for o in ours)
    assert any(1 in o for o in ours)  # an EOS was produced and generation went on
    # A checkpoint's generation settings (here a huge repetition penalty) do not bend the raw argmax.
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    assert greedy_continuations(model, prefixes.tolist(), 12) == ours
    with pytest.raises(ValueError, match="same length"):
        greedy_continuations(model, [[5, 6], [5]], 3)


def _levenshtein_recursive(a: tuple, b: tuple) -> int:
    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_token_edit_distance_matches_the_recursive_definition():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = tuple(rng.integers(0, 4, rng.integers(0, 9)).tolist())
        b = tuple(rng.integers(0, 4, rng.integers(0, 9)).tolist())
        assert token_edit_distance(a, b) == _levenshtein_recursive(a, b)


def test_extraction_test_counts_exact_and_approximate_matches(tiny_kwargs):
    model = tiny_model(tiny_kwargs, seed=2)
    prefixes = torch.randint(3, 97, (6, 10), generator=torch.Generator().manual_seed(4)).tolist()
    continuations = greedy_continuations(model, prefixes, 20)
    sequences = [p + c for p, c in zip(prefixes, continuations, strict=True)]  # the model "memorised" these
    sequences[1] = sequences[1][:12] + [(t + 1) % 97 for t in sequences[1][12:14]] + sequences[1][14:]  # 2/20 off
    sequences[2] = sequences[2][:10] + [(t + 1) % 97 for t in sequences[2][10:13]] + sequences[2][13:]  # 3/20 off
    result = extraction_test(model, sequences + [[5] * 10], prefix_len=10, suffix_len=20, max_edit_fraction=0.1)
    assert (result.num_tested, result.num_skipped) == (6, 1)
    assert result.exact_matches == 4 and result.approximate_matches == 5  # 2 edits ≤ 10% of 20, 3 edits are not
    assert result.exact_rate == pytest.approx(4 / 6) and result.approximate_rate == pytest.approx(5 / 6)


# -------------------------------------------------------------------------------------------- the full audit


def _train_on_canaries(tiny_kwargs, tmp_path, canary_set, **dp_kwargs):
    filler = torch.randint(4, 97, (40, 15), generator=torch.Generator().manual_seed(5)).tolist()
    data = append_canaries(pack_documents(filler, seq_len=17, eos_token_id=1, pad_token_id=0), canary_set)
    model = tiny_model(tiny_kwargs, seed=3)
    reference = tiny_model(tiny_kwargs, seed=3)
    args = DPTrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=32,
        logical_batch_size=32,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        target_delta=1e-5,
        per_sample_max_grad_norm=1.0,
        deterministic_noise_for_testing=True,
        **dp_kwargs,
    )
    trainer = DPTrainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorForPackedSequences())
    trainer.train()
    return model, reference, trainer


def test_audit_catches_a_non_private_run_and_refutes_a_false_claim(tiny_kwargs, tmp_path):
    canary_set = make_canaries(100, 97, length=16, excluded_token_ids=SPECIALS, bos_token_id=2, seed=7)
    model, reference, trainer = _train_on_canaries(
        tiny_kwargs, tmp_path, canary_set, noise_multiplier=0.0, max_steps=40
    )
    assert math.isinf(trainer.get_epsilon())
    report = run_privacy_audit(model, canary_set, reference_model=reference, claimed_epsilon=math.inf, seed=0)
    mia = report.canaries["membership_inference"]
    assert report.verdict == "non_private" and mia["auc"] > 0.95
    assert report.canaries["one_run"]["epsilon_lower_bound"] > 1.0
    exposure = report.canaries["exposure"]
    assert exposure["mean"] > 3 * exposure["expected_without_memorisation"]
    # The same model presented as (0.5, 1e-5)-DP: the audit refutes the claim.
    false_claim = run_privacy_audit(model, canary_set, reference_model=reference, claimed_epsilon=0.5, seed=0)
    assert false_claim.verdict == "violation" and "VIOLATION" in false_claim.verdict_text
    json.loads(false_claim.to_json())

    # The model card section: added once under the existing card, replaced on a second audit; an unterminated
    # section (edited by hand) is refused rather than duplicated.
    from vaultgemma_hf.privacy_eval.model_card import AUDIT_END, write_audit_to_model_card

    (tmp_path / "README.md").write_text("# card\n\nDP configuration.\n")
    for _ in range(2):
        write_audit_to_model_card(tmp_path, false_claim)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# card\n\nDP configuration.\n\n") and card.count("## Empirical privacy audit") == 1
    assert "| Verdict | VIOLATION" in card
    (tmp_path / "README.md").write_text(card.replace(AUDIT_END, ""))
    with pytest.raises(ValueError, match="no end marker"):
        write_audit_to_model_card(tmp_path, false_claim)


def test_audit_refutes_a_claim_whose_noise_is_too_small(tiny_kwargs, tmp_path):
    # σ = 0.3 (ε ≈ 79 here) presented as ε = 1: the kind of bug (noise mis-scaled) the audit is for.
    canary_set = make_canaries(400, 97, length=8, excluded_token_ids=SPECIALS, bos_token_id=2, seed=11)
    model, reference, trainer = _train_on_canaries(
        tiny_kwargs, tmp_path, canary_set, noise_multiplier=0.3, max_steps=40
    )
    assert trainer.get_epsilon() > 20
    report = run_privacy_audit(
        model, canary_set, reference_model=reference, claimed_epsilon=1.0, guesses_per_side=[40], seed=0
    )
    assert report.verdict == "violation" and report.canaries["one_run"]["claim_refuted"]
    assert report.canaries["one_run"]["epsilon_lower_bound"] > 1.0
    honest = run_privacy_audit(
        model,
        canary_set,
        reference_model=reference,
        claimed_epsilon=trainer.get_epsilon(),
        guesses_per_side=[40],
        seed=0,
    )
    assert honest.verdict == "consistent"
    # Under shuffle the claim is for zero-out adjacency, which this add/remove test cannot refute.
    shuffled = run_privacy_audit(
        model,
        canary_set,
        reference_model=reference,
        claimed_epsilon=1.0,
        guesses_per_side=[40],
        seed=0,
        sampling="shuffle",
    )
    assert shuffled.verdict == "not_comparable" and "zero-out" in shuffled.verdict_text


def test_canary_scores_do_not_depend_on_the_coins(tiny_kwargs, monkeypatch):
    # Every forward pass the audit makes over canaries sees them all, in file order, whatever the coins: a canary's
    # score cannot depend on the other canaries' coins through batch composition.
    import vaultgemma_hf.privacy_eval.audit as audit_module

    calls = []
    real = audit_module.sequence_log_perplexity

    def spy(model, sequences, **kwargs):
        calls.append([tuple(s) for s in sequences])
        return real(model, sequences, **kwargs)

    monkeypatch.setattr(audit_module, "sequence_log_perplexity", spy)
    model, reference = tiny_model(tiny_kwargs, seed=0), tiny_model(tiny_kwargs, seed=1)
    canary_set = make_canaries(40, 97, length=6, excluded_token_ids=SPECIALS, bos_token_id=2, seed=12)
    flipped = dataclasses.replace(
        canary_set, canaries=tuple(dataclasses.replace(c, included=not c.included) for c in canary_set.canaries)
    )
    reports = []
    for canaries in (canary_set, flipped):
        calls.clear()
        reports.append(run_privacy_audit(model, canaries, reference_model=reference, batch_size=3, seed=0))
        assert calls == [[c.token_ids for c in canary_set.canaries]] * 2  # the model, then the reference
    auc, auc_flipped = (r.canaries["membership_inference"]["auc"] for r in reports)
    assert auc_flipped == pytest.approx(1 - auc, abs=1e-12)


def test_audit_does_not_refute_dp_trainer_guarantee(tiny_kwargs, tmp_path):
    # 1,000 canaries and k = 100 / 200 per side: a model that gave its canaries away would reach a bound of 3.6 or
    # more (all guesses right at α/2), well above the claimed ε = 2, so "consistent" is a real outcome here.
    canary_set = make_canaries(1000, 97, length=8, excluded_token_ids=SPECIALS, bos_token_id=2, seed=8)
    model, reference, trainer = _train_on_canaries(tiny_kwargs, tmp_path, canary_set, target_epsilon=2.0, max_steps=40)
    epsilon = trainer.get_epsilon()
    assert 0 < epsilon <= 2.0
    report = run_privacy_audit(
        model, canary_set, reference_model=reference, claimed_epsilon=epsilon, guesses_per_side=[100, 200], seed=0
    )
    assert report.verdict == "consistent" and not report.canaries["one_run"]["claim_refuted"]
    assert report.canaries["one_run"]["epsilon_lower_bound"] <= epsilon
    assert report.canaries["one_run"]["bonferroni_settings"] == 2
    assert all(s["significance"] == pytest.approx(0.05 / 2) for s in report.canaries["one_run"]["per_setting"])
    assert min(one_run_epsilon_lower_bound(1000, 2 * k, 2 * k, 1e-5, 0.05 / 2) for k in (100, 200)) > 3.5


def test_audit_on_training_data_and_bad_settings(tiny_kwargs):
    model = tiny_model(tiny_kwargs)
    canary_set = make_canaries(20, 97, length=8, excluded_token_ids=SPECIALS, bos_token_id=2, seed=9)
    g = torch.Generator().manual_seed(6)
    training = torch.randint(4, 97, (12, 24), generator=g).tolist()
    heldout = torch.randint(4, 97, (8, 24), generator=g).tolist()
    report = run_privacy_audit(
        model,
        canary_set,
        claimed_epsilon=1.0,
        training_sequences=training,
        heldout_sequences=heldout,
        extraction_prefix_len=8,
        extraction_suffix_len=8,
        max_data_sequences=10,
        num_exposure_references=30,
        seed=0,
    )
    assert report.training_data["num_members"] == 10 and report.training_data["num_nonmembers"] == 8
    assert report.extraction["training"]["num_tested"] == 10 and report.extraction["heldout"]["num_tested"] == 8
    # TPR at an FPR below 1 / (number of held-out canaries) is not measurable: None, not "TPR at FPR 0".
    n_out = report.canaries["num_held_out"]
    tprs = report.canaries["membership_inference"]["tpr_at_fpr"]
    assert tprs["0.001"] is None and {level: tprs[level] is None for level in ("0.1", "0.01")} == {
        level: float(level) * n_out < 1 for level in ("0.1", "0.01")
    }
    assert report.training_data["tpr_at_fpr"]["0.1"] is None  # 8 held-out sequences
    assert report.canaries["exposure"]["num_references"] == len(canary_set.held_out) + 30
    assert report.score == "log-likelihood"
    with pytest.raises(ValueError, match="drawn from 1000 token ids"):
        run_privacy_audit(model, make_canaries(20, 1000, length=4, seed=0))
    with pytest.raises(ValueError, match="guesses per side"):
        run_privacy_audit(model, canary_set, guesses_per_side=[11])
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="claimed_epsilon"):
            run_privacy_audit(model, canary_set, claimed_epsilon=bad)
    lopsided = dataclasses.replace(
        canary_set, canaries=tuple(dataclasses.replace(c, included=True) for c in canary_set.canaries)
    )
    with pytest.raises(ValueError, match="both included and held-out"):
        run_privacy_audit(model, lopsided)


@pytest.mark.parametrize("verdict_case", ["consistent", "violation", "not_comparable"])
def test_verdicts_print_the_claimed_epsilon_rounded_up(verdict_case):
    """The claim is printed as the model card prints it (rounded up: 7.98501 -> 7.986, never 7.985)."""
    from vaultgemma_hf.privacy_eval.audit import _verdict

    refuted = verdict_case == "violation"
    sampling = "shuffle" if verdict_case == "not_comparable" else "poisson"
    verdict, text = _verdict(0.5, refuted, 7.98501, 1e-5, 0.05, sampling)
    assert verdict == verdict_case and "7.986" in text and "7.985" not in text
