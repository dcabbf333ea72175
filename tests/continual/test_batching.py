from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from continual.batching import (
    IGNORE_INDEX,
    completion_log_probs,
    encode_pair,
    pad_batch,
    pad_id_of,
    sequence_log_probs,
)


def test_encode_pair_layout(tokenizer: PreTrainedTokenizerFast) -> None:
    item = encode_pair(tokenizer, prompt="Q: red\nAnswer:", completion=" red", add_eos=True)
    prompt = tokenizer.encode("Q: red\nAnswer:", add_special_tokens=False)
    completion = tokenizer.encode(" red", add_special_tokens=False)
    assert item.ids == (tokenizer.bos_token_id, *prompt, *completion, tokenizer.eos_token_id)
    assert item.prompt_len == 1 + len(prompt)


def test_encode_pair_cuts_the_middle_of_a_long_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = "Options: red, blue.\nInput: " + " ".join(["word"] * 50) + "\nAnswer:"
    item = encode_pair(tokenizer, prompt=prompt, completion=" blue", add_eos=True, max_length=21)
    full = encode_pair(tokenizer, prompt=prompt, completion=" blue", add_eos=True)
    completion = len(full.ids) - full.prompt_len  # " blue" + eos
    keep = 21 - 1 - completion  # prompt tokens that fit beside bos and the completion
    assert len(item.ids) == 21 and item.ids[0] == tokenizer.bos_token_id
    assert item.prompt_len == 1 + keep
    # the head (instruction) and the tail (answer cue + completion) survive, the middle goes
    assert item.ids[1 : 1 + keep // 2] == full.ids[1 : 1 + keep // 2]
    tail = keep - keep // 2 + completion
    assert item.ids[-tail:] == full.ids[-tail:]
    assert tokenizer.decode(item.ids[1 : 1 + keep // 2]).startswith("Opti")
    assert tokenizer.decode(item.ids[item.prompt_len - 3 : item.prompt_len]).endswith("Answer:")
    long = encode_pair(tokenizer, prompt="p", completion=" red" * 30, add_eos=True, max_length=8)
    assert len(long.ids) == 8 and long.prompt_len == 2


def test_pad_batch_masks_prompt_and_padding(tokenizer: PreTrainedTokenizerFast) -> None:
    a = encode_pair(tokenizer, prompt="short", completion=" x", add_eos=True)
    b = encode_pair(tokenizer, prompt="a much longer prompt here", completion=" y", add_eos=True)
    batch = pad_batch([a, b], pad_id=pad_id_of(tokenizer))
    assert batch.input_ids.shape == (2, len(b.ids))
    assert batch.attention_mask[0].tolist() == [1] * len(a.ids) + [0] * (len(b.ids) - len(a.ids))
    assert batch.num_tokens == len(a.ids) + len(b.ids)
    expected = [IGNORE_INDEX] * a.prompt_len + list(a.ids[a.prompt_len :])
    expected += [IGNORE_INDEX] * (len(b.ids) - len(a.ids))
    assert batch.labels[0].tolist() == expected
    assert batch.input_ids[0, len(a.ids) :].eq(tokenizer.pad_token_id).all()


def test_completion_log_probs_matches_direct_sum() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    sums, counts = completion_log_probs(logits, labels)
    logp = logits.log_softmax(-1)
    expected0 = logp[0, 1, 3] + logp[0, 2, 4]
    expected1 = logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 6] + logp[1, 3, 0]
    torch.testing.assert_close(sums, torch.stack([expected0, expected1]))
    assert counts.tolist() == [2, 4]


def test_sequence_log_probs_scores_only_completions_like_full_logits(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """The head-at-completions path equals log-softmax over the model's full logits, through a
    PEFT wrapper too; a model without a separable head takes the full path."""
    from peft import LoraConfig, get_peft_model

    from continual.models import build_tiny_llama

    model, _ = build_tiny_llama(seed=4, tokenizer=tokenizer)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for layer in peft_model.modules():  # non-zero B so the adapter matters
        if hasattr(layer, "lora_B"):
            for lin in layer.lora_B.values():
                torch.nn.init.normal_(lin.weight, std=0.5)
    pairs = [("Q: red ball\nAnswer:", " red"), ("Q: a\nAnswer:", " green blue"), ("x", " y")]
    batch = pad_batch(
        [encode_pair(tokenizer, prompt=p, completion=c, add_eos=True) for p, c in pairs],
        pad_id=pad_id_of(tokenizer),
    )
    with torch.no_grad():
        full = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        expected = completion_log_probs(full, batch.labels)
        got = sequence_log_probs(peft_model, batch)

        class Opaque(torch.nn.Module):  # no get_decoder / get_output_embeddings
            config = None

            def forward(self, **kw: torch.Tensor) -> object:
                return peft_model(**kw)

        fallback = sequence_log_probs(Opaque(), batch)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    assert got[1].tolist() == expected[1].tolist()
    torch.testing.assert_close(fallback[0], expected[0], rtol=0, atol=0)
