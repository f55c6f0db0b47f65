"""Oracle: our log-prob extraction and DPO loss against TRL's DPOTrainer on identical tokens.

TRL (1.16) has no standalone DPO loss function: the loss lives in ``DPOTrainer._compute_loss``. So we
build a real DPOTrainer (beta 0.1, sigmoid loss, CPU) on the tiny Llama with a separate reference
model whose weights are the policy's plus seeded noise (so the loss is not trivially log 2), let its
own data collator pad a batch of conversational rows, and call its ``compute_loss``. From the same
padded batch we rebuild our ``TokenizedExample``s (prompt = attended tokens outside TRL's
``completion_mask``, responses = tokens inside it), run ``ResponseLogps`` on the policy and the
reference in both layouts, and check that ``dpo_loss(beta=0.1).mean()``, the implicit rewards, the
summed log-probs and the gradients of every policy parameter agree with TRL's.

Tokenisation difference (TRL vs selm on the same conversational rows), asserted exactly in
``test_tokenisation_differs_only_by_the_newline_after_end_of_turn``:

- prompts are identical (chat template with the generation prompt);
- TRL's completion is everything the chat template writes after the prompt, so with a ChatML
  template it ends ``<|im_end|>`` + ``"\\n"``; selm cuts the response right after the end-of-turn
  token (``<|im_end|>``), because generation stops there and the newline is never sampled. TRL thus
  scores one more token per response (log p("\\n" | ... <|im_end|>)); the loss differs accordingly on
  the same text, which is why the loss oracle runs on TRL's token ids, not on our tokenisation.
"""

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("trl")

from selm.data import PairRecord  # noqa: E402
from selm.objective.logprobs import TokenizedExample, batch_logps, collate_padded, collate_prefix, tokenize_pairs  # noqa: E402
from selm.objective.losses import dpo_loss  # noqa: E402

BETA = 0.1

ROWS = [
    {"prompt": [{"role": "user", "content": "Say hi"}],
     "chosen": [{"role": "assistant", "content": "Hi there, friend!"}],
     "rejected": [{"role": "assistant", "content": "no"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": "Yes?"}, {"role": "user", "content": "Name a colour."}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "I would rather talk about something else entirely."}]},
    {"prompt": [{"role": "user", "content": "Count to three."}],
     "chosen": [{"role": "assistant", "content": "1, 2, 3."}],
     "rejected": [{"role": "assistant", "content": "1, 5."}]},
    {"prompt": [{"role": "user", "content": "x" * 40}],
     "chosen": [{"role": "assistant", "content": "short"}],
     "rejected": [{"role": "assistant", "content": "a much longer rejected answer here"}]},
    {"prompt": [{"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "Five, probably."}]},
]


def load_pair(path):
    """The policy (as saved) and a reference that differs from it by seeded noise."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy.train(), ref.eval()


@pytest.fixture(scope="module")
def trl_run(tiny_model_dir, tmp_path_factory):
    """TRL's loss, metrics and gradients on one padded batch of all ROWS."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy, ref = load_pair(tiny_model_dir)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=BETA, loss_type=["sigmoid"],
                     report_to="none", use_cpu=True, max_length=1024, per_device_train_batch_size=len(ROWS),
                     save_strategy="no", disable_dropout=True, precompute_ref_log_probs=False, seed=0,
                     bf16=False)  # transformers 5 defaults bf16 to True, even on CPU
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(len(ROWS))]  # tokenised by TRL, in order
    batch = trainer.data_collator(rows)  # TRL's own padding: [chosen rows; rejected rows]
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"tok": tok, "rows": rows, "batch": batch, "loss": loss.detach(), "grads": grads, "metrics": metrics}


def examples_from_trl_batch(batch) -> list[TokenizedExample]:
    """Our examples from TRL's padded batch: rows [0, B) are prompt+chosen, [B, 2B) prompt+rejected."""
    ids, att, comp = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    B = ids.shape[0] // 2
    out = []
    for i in range(B):
        prompt = ids[i][att[i] & ~comp[i]].tolist()
        assert prompt == ids[B + i][att[B + i] & ~comp[B + i]].tolist()  # one prompt per pair
        out.append(TokenizedExample(prompt, [ids[i][comp[i]].tolist(), ids[B + i][comp[B + i]].tolist()]))
    return out


@pytest.mark.parametrize("collate", [collate_padded, collate_prefix], ids=["padded", "prefix"])
def test_dpo_loss_rewards_and_gradients_match_trl(trl_run, tiny_model_dir, collate):
    from selm.objective.logprobs import ResponseLogps

    policy, ref = load_pair(tiny_model_dir)
    examples = examples_from_trl_batch(trl_run["batch"])
    batch = collate(examples, trl_run["tok"].pad_token_id)
    with torch.no_grad():
        ref_lp = batch_logps(ResponseLogps(ref), batch)
    lp = batch_logps(ResponseLogps(policy), batch)
    losses, rc, rr = dpo_loss(lp["chosen"], lp["rejected"], ref_lp["chosen"], ref_lp["rejected"], beta=BETA)
    loss = losses.mean()  # TRL: per_sequence_loss.mean()
    loss.backward()

    m = trl_run["metrics"]
    assert abs(float(trl_run["loss"]) - 0.6931) > 1e-3  # the reference really differs from the policy
    assert_close(loss.detach(), trl_run["loss"], atol=1e-5, rtol=1e-5)
    assert_close(rc.mean().item(), m["rewards/chosen"], atol=1e-5, rtol=1e-5)
    assert_close(rr.mean().item(), m["rewards/rejected"], atol=1e-5, rtol=1e-5)
    assert_close((rc - rr).mean().item(), m["rewards/margins"], atol=1e-5, rtol=1e-5)
    assert_close((rc > rr).float().mean().item(), m["rewards/accuracies"])
    assert_close(lp["chosen"].mean().item(), m["logps/chosen"], atol=1e-4, rtol=1e-5)
    assert_close(lp["rejected"].mean().item(), m["logps/rejected"], atol=1e-4, rtol=1e-5)
    for name, p in policy.named_parameters():
        assert_close(p.grad, trl_run["grads"][name], atol=1e-6, rtol=1e-4, msg=lambda s, n=name: f"{n}: {s}")


def test_tokenisation_differs_only_by_the_newline_after_end_of_turn(trl_run):
    tok = trl_run["tok"]
    pairs = [PairRecord(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in ROWS]
    ours = tokenize_pairs(tok, pairs, max_length=1024, max_prompt_length=512, with_exploration=False)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for o, t in zip(ours, trl_run["rows"]):
        assert o.prompt == t["prompt_ids"]
        for mine, theirs in zip(o.responses, [t["chosen_ids"], t["rejected_ids"]]):
            assert mine[-1] == im_end
            assert theirs == mine + newline  # TRL keeps the template's "\n" after <|im_end|>; we cut it
