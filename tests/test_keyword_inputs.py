"""Keyword inputs of a captured model (tedfx.signature), in one process: what works and what is a clear error.

A captured graph takes exactly the inputs of the call that captured it. The tests check that an HF
model captured with `labels=` returns the HF loss, that inputs may be passed by name or position,
that None for a keyword the model defaults to None equals leaving it out, and that any other
difference is a TypeError naming the keyword and the capture call that would take it. The
ParallelModule side runs in tests/test_parallel_semantics.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import tedfx
from tedfx.signature import CallSignature

from models import tiny_gpt, tiny_llama

MOE = tedfx.MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0)


@functools.cache
def _llama(with_kwargs: bool):
    model, (ids,) = tiny_llama()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = {"attention_mask": mask, "labels": ids} if with_kwargs else None
    return model, ids, mask, tedfx.to_moe(model, (ids,), moe=MOE, example_kwargs=kwargs)


def test_hf_model_captured_with_labels_returns_the_hf_loss():
    model, ids, mask, moe_model = _llama(True)
    out = moe_model(ids, attention_mask=mask, labels=ids)
    logits = out.logits
    # The HF loss: next-token cross entropy on the model's own logits.
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert moe_model.get_parameter("model.embed_tokens.weight").grad is not None


def test_labels_captured_as_the_same_tensor_as_the_inputs_stay_a_separate_input():
    """HF habit: `labels=input_ids`, one tensor object. Called later with other labels, the logits are
    still those of the input ids (the graph must not embed the labels) and the loss is on the labels."""
    model, ids, mask, moe_model = _llama(True)  # captured with labels=ids, the same object
    moe_model.eval()
    labels = torch.randint(1, int(ids.max()) + 1, ids.shape, generator=torch.Generator().manual_seed(7))
    labels[:, :2] = -100  # ignored positions: an index no embedding would take
    out, same = moe_model(ids, attention_mask=mask, labels=labels), moe_model(ids, attention_mask=mask, labels=ids)
    moe_model.train()
    torch.testing.assert_close(out.logits, same.logits)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


def test_inputs_by_name_or_by_position_are_the_same_call():
    _, ids, mask, moe_model = _llama(True)
    moe_model.eval()
    a = moe_model(ids, attention_mask=mask, labels=ids).loss
    b = moe_model(input_ids=ids, attention_mask=mask, labels=ids).loss
    c = moe_model(ids, mask, labels=ids).loss  # attention_mask is the forward's second parameter
    moe_model.train()
    assert torch.equal(a, b) and torch.equal(a, c)


def test_none_for_a_keyword_the_model_defaults_to_none_is_leaving_it_out():
    model, ids, _, moe_model = _llama(False)
    moe_model.eval()
    a = moe_model(ids).logits
    b = moe_model(ids, position_ids=None, inputs_embeds=None).logits
    moe_model.train()
    assert torch.equal(a, b)


def test_a_keyword_absent_at_capture_names_the_capture_that_takes_it():
    _, ids, mask, moe_model = _llama(False)
    with pytest.raises(TypeError) as info:
        moe_model(ids, attention_mask=mask, labels=ids)
    message = str(info.value)
    assert message.startswith("LlamaForCausalLM was captured with inputs (input_ids) and no keyword inputs, but "
                              "this call passes attention_mask=, labels=, which the capture did not see.")
    assert "tedfx.to_moe(model, example_inputs, ..., example_kwargs={'attention_mask': ..., 'labels': ...})" \
        in message


def test_a_captured_keyword_left_out_is_a_clear_error():
    _, ids, mask, moe_model = _llama(True)
    for call, left_out in ((lambda: moe_model(ids, attention_mask=mask), "labels="),
                           (lambda: moe_model(ids, attention_mask=mask, labels=None), "labels="),
                           (lambda: moe_model(ids), "attention_mask=, labels=")):
        with pytest.raises(TypeError, match=f"but this call leaves out {left_out}"):
            call()


def test_too_many_inputs_or_one_twice_are_clear_errors():
    model, (idx,) = tiny_gpt()
    moe_model = tedfx.to_moe(model, (idx,), moe=MOE)
    assert torch.equal(moe_model(idx=idx), moe_model(idx))
    with pytest.raises(TypeError, match=r"GPT was captured with inputs \(idx\) and no keyword inputs; this call "
                                        r"passes 2 positional inputs"):
        moe_model(idx, idx)
    with pytest.raises(TypeError, match="passes idx twice"):
        moe_model(idx, idx=idx)
    with pytest.raises(TypeError, match="passes targets=, which the capture did not see"):
        moe_model(idx, targets=idx)


def test_a_copy_of_the_module_keeps_its_call_signature_and_input_checks():
    _, ids, mask, moe_model = _llama(True)
    twin = copy.deepcopy(moe_model)
    with pytest.raises(TypeError, match="leaves out labels="):
        twin(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="the captured graph expects"):
        twin(ids[:, :, None], attention_mask=mask, labels=ids)


def test_the_signature_is_recorded_from_the_model_forward():
    model, ids, mask, _ = _llama(True)
    sig = CallSignature.of(model, (ids,), {"attention_mask": mask, "labels": ids})
    assert sig.positional == ("input_ids",) and sig.keywords == ("attention_mask", "labels")
    assert sig.params[0] == "attention_mask" and "position_ids" in sig.none_defaults


def test_a_model_that_returns_its_kv_cache_anyway_is_told_to_capture_with_use_cache_false():
    """HF T5 (transformers 5) returns an EncoderDecoderCache unless the call says use_cache=False."""
    import sys

    capture_module = sys.modules["tedfx.capture"]
    error = RuntimeError("Found <class 'transformers.cache_utils.EncoderDecoderCache'> in output, which is not a "
                         "known type. If this type holds tensors, you need to register a pytree for it.")
    message = capture_module._explain_export_failure(torch.nn.Identity(), error)
    assert message.endswith("Hint: the model returns its KV cache although config.use_cache is False (some HF "
                            "models decide per call); capture with example_kwargs={'use_cache': False, ...} and "
                            "pass use_cache=False in the calls too.")
