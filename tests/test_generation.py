"""The generation engine (selm/engines/generation.py) and the generate stage (selm/stages/generate.py) on tiny models.

The fast path (length-grouped left-padded batches, one prefill per prompt, rows dropped as they
finish) must give the same greedy text as Hugging Face's `generate` run one prompt at a time.

A freshly initialised tiny Llama repeats one whitespace token forever, which would make these
tests vacuous; `talky` rescales its weights so that greedy decoding varies from prompt to prompt
and ends its turn at varied lengths.
"""

import json

import pytest
import torch

from selm.io import atomic_write_jsonl
from selm.chat import decode_response, end_of_turn_ids
from selm.config import load_config
from selm.stages.generate import run_generate
from selm.engines.generation import HFGenerator, decode_batch, generate, inverse_cdf, next_tokens, packed_linears
from selm.engines.sampling import SamplingParams, encode_for_generation, mix64, stream_keys, uniforms
from selm.io import InputError
from selm.models import load_causal_lm, load_tokenizer

PROMPTS = [
    "Hi",
    "Write one sentence about the weather, please.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    "Count to three!",
    "Tell me a very long story about a small garden, a cat, a cup of tea and a rainy morning.",
    "Why?",
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "What is 2+2?"}],
    "Say something nice about Mondays.",
]


@pytest.fixture(scope="module")
def talky_dir(tmp_path_factory):
    from selm.tiny import save_tiny

    src = save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    tok = load_tokenizer(src)
    model = load_causal_lm(src)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        # Tied embeddings: a larger <|im_end|> row makes its logit win in some contexts, not all.
        model.get_input_embeddings().weight[end_of_turn_ids(tok)] *= 2.0
    out = tmp_path_factory.mktemp("talky") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def talky(talky_dir):
    return load_causal_lm(talky_dir).eval(), load_tokenizer(talky_dir)


def run(model, tok, prompts=PROMPTS, **kw):
    args = dict(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=24, greedy=False, batch_size=3, seed=0)
    args.update(kw)
    return generate(model, tok, prompts, **args)


# ------------------------------------------------------------------------------------------------
# Random numbers and token choice


def test_mix64_is_splitmix64():
    def ref(x):  # SplitMix64's finaliser on Python ints
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    xs = [0, 1, 2, 12345, 2**40 + 7, 2**62 + 3]
    got = mix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert [g % 2**64 for g in got] == [ref(x) for x in xs]


def test_sampler_follows_softmax_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    n = 20000
    keys = stream_keys(7, torch.arange(n), torch.zeros(n, dtype=torch.long))
    rows = logits.expand(n, -1)
    no_greedy = torch.zeros(n, dtype=torch.bool)
    tok = next_tokens(rows, no_greedy, keys, step=0, temperature=0.8, top_p=1.0)
    freq = torch.bincount(tok, minlength=6).double() / n
    want = torch.softmax(logits.double() / 0.8, -1)
    assert (freq - want).abs().max() < 0.015
    # top_p=0.7 keeps the smallest head reaching 0.7 (tokens 0 and 1 here), renormalised.
    tok = next_tokens(rows, no_greedy, keys, step=1, temperature=0.8, top_p=0.7)
    head = want[:2] / want[:2].sum()
    freq = torch.bincount(tok, minlength=6).double() / n
    assert set(tok.unique().tolist()) == {0, 1}
    assert (freq[:2] - head).abs().max() < 0.015
    # Greedy rows take the argmax whatever their key.
    assert next_tokens(rows[:4], torch.ones(4, dtype=torch.bool), keys[:4], 0, 0.8, 1.0).tolist() == [0] * 4


def whole_row(probs, u):
    """The engine's former inverse-CDF search: one float64 cumulative sum over the whole row."""
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp_max(probs.shape[1] - 1)


def test_two_level_search_picks_the_whole_row_cumsums_token():
    """inverse_cdf (block sums, then one block) picks the token a float64 cumulative sum over the
    whole row picks (the engine's former search), on vocabularies of whole and partial blocks, with
    peaked, flat and partly zeroed rows; zero-probability tokens are never picked."""
    g = torch.Generator().manual_seed(0)
    n = 400
    for vocab in (49152, 1000, 300, 256, 7):
        for scale in (0.5, 3.0, 10.0):
            probs = torch.softmax(torch.randn(n, vocab, generator=g) * scale, -1)
            probs[:n // 2] *= torch.rand(n // 2, vocab, generator=g) < 0.3
            probs[:n // 2, 0] += 1e-3  # no row all zero
            u = uniforms(stream_keys(vocab, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0)
            got = inverse_cdf(probs, u)
            assert torch.equal(got, whole_row(probs, u)), (vocab, scale)
            assert bool((probs.gather(1, got.unsqueeze(1)) > 0).all())


# ------------------------------------------------------------------------------------------------
# The engine


def test_shapes_counts_and_order(talky):
    model, tok = talky
    out = run(model, tok, num_samples=3)
    assert len(out) == len(PROMPTS) and all(len(r) == 3 and all(isinstance(s, str) for s in r) for r in out)
    greedy = run(model, tok, greedy=True)
    assert all(len(r) == 1 for r in greedy)
    assert len({r[0] for r in greedy}) > 3  # the talky model answers prompts differently
    # Outputs follow input order, whatever the length grouping did.
    assert run(model, tok, prompts=PROMPTS[::-1], greedy=True) == greedy[::-1]


def test_greedy_matches_hf_generate_one_prompt_at_a_time(talky):
    model, tok = talky
    ref = hf_greedy(model, tok, PROMPTS, 40)
    for bs in (1, 3, 8):
        assert [r[0] for r in run(model, tok, greedy=True, max_new_tokens=40, batch_size=bs)] == ref
    # A greedy row decoded alongside sampled rows of the same prompts (shared prefill, rows dropped
    # from the cache as they finish) is still the same greedy response.
    gen = HFGenerator(model, tok, batch_size=4)
    mixed = gen.generate(PROMPTS, SamplingParams(num_samples=3, temperature=1.0, max_new_tokens=40,
                                                 include_greedy=True, seed=1))
    assert [r[-1].text for r in mixed] == ref


def hf_greedy(model, tok, prompts, max_new_tokens):
    stop = end_of_turn_ids(tok)
    ref = []
    for ids in encode_for_generation(tok, prompts):
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                           eos_token_id=stop, pad_token_id=tok.pad_token_id)
        ref.append(decode_response(tok, y[0, len(ids):].tolist(), stop))
    return ref


def test_greedy_matches_hf_generate_with_absolute_positions():
    """GPT-2 adds absolute position embeddings (RoPE models only see relative ones), so it checks that
    a left-padded prompt gets the positions it would have unpadded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from selm.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(15.0)  # std 0.02 -> 0.3, as for `talky`
    ref = hf_greedy(model, tok, PROMPTS, 30)
    assert len(set(ref)) > 3
    assert [r[0] for r in run(model, tok, greedy=True, max_new_tokens=30, batch_size=8)] == ref


def test_seeds_and_batch_invariance(talky):
    model, tok = talky
    a = run(model, tok, seed=1, top_p=0.9)
    assert run(model, tok, seed=1, top_p=0.9) == a
    assert run(model, tok, seed=2, top_p=0.9) != a
    # Each sample has its own random stream: batch size and sample count do not change it.
    assert run(model, tok, seed=1, top_p=0.9, batch_size=1) == a
    assert [r[:2] for r in run(model, tok, seed=1, top_p=0.9, num_samples=3)] == a
    assert all(r[0] != r[1] for r in a if r[0] or r[1])


def test_stops_at_end_of_turn(talky):
    model, tok = talky
    stop = end_of_turn_ids(tok)
    enc = encode_for_generation(tok, PROMPTS)
    params = SamplingParams(num_samples=3, temperature=1.0, max_new_tokens=32, include_greedy=True, seed=0)
    ids, finished = decode_batch(model, enc, list(range(len(enc))), params, stop, tok.pad_token_id)
    assert len(ids) == len(PROMPTS) * 4
    assert not any(t in stop for row in ids for t in row)
    assert any(finished) and not all(finished)
    for row, done in zip(ids, finished):
        assert len(row) <= 32 and (done or len(row) == 32)
    out = HFGenerator(model, tok, batch_size=8).generate(PROMPTS, params)
    assert all("<|im_end|>" not in s.text for r in out for s in r)
    assert [s.finished for r in out for s in r] == finished


def test_the_engine_gives_the_former_engines_tokens(talky, monkeypatch):
    """HFGenerator decodes on oneDNN-packed fp32 weights (packed_linears) and searches the CDF in two
    levels; its tokens, sampled and greedy, are those of the former engine (plain `linear` layers,
    one whole-row cumulative sum), and the model is given back unchanged."""
    from selm.engines import generation

    model, tok = talky
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    x = torch.randn(5, 3, linears[0].in_features)
    with packed_linears(model):
        assert all("forward" in vars(m) for m in linears)  # really packed, not silently skipped
        assert torch.allclose(linears[0](x), torch.nn.functional.linear(x, linears[0].weight, linears[0].bias),
                              atol=1e-5)
    assert not any("forward" in vars(m) for m in linears)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
        xb = x[..., :64].to(torch.bfloat16)
        with packed_linears(layer):
            assert "forward" in vars(layer)
            assert torch.allclose(layer(xb).float(), torch.nn.functional.linear(xb, layer.weight, layer.bias).float(),
                                  rtol=2e-2, atol=2e-2)
    enc = encode_for_generation(tok, PROMPTS)
    params = SamplingParams(num_samples=3, temperature=1.0, max_new_tokens=32, include_greedy=True, seed=5)
    with monkeypatch.context() as m:
        m.setattr(generation, "inverse_cdf", whole_row)
        plain = decode_batch(model, enc, list(range(len(enc))), params, end_of_turn_ids(tok), tok.pad_token_id)
    with packed_linears(model):
        packed = decode_batch(model, enc, list(range(len(enc))), params, end_of_turn_ids(tok), tok.pad_token_id)
    assert packed == plain
    assert len({tuple(r) for r in plain[0]}) > 8 and any(plain[1]) and not all(plain[1])


def test_bad_prompt_is_a_one_line_error(talky):
    model, tok = talky
    with pytest.raises(InputError, match=r"prompts\[1\]"):
        run(model, tok, prompts=["ok", [{"role": "assistant", "content": "x"}]])


# ------------------------------------------------------------------------------------------------
# The generate stage

ROWS = [
    {"prompt_id": "a", "prompt": [{"role": "user", "content": "Name a fruit."}], "chosen": "Apple.", "rejected": "Car."},
    {"prompt_id": "b", "prompt": [{"role": "user", "content": "Hi"}], "chosen": None, "rejected": None},
    {"prompt_id": "c", "prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "1, 5."},
]


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    atomic_write_jsonl(p, ROWS)
    return p


def stage(talky_dir, prompts_file, out, *overrides, seed=5):
    cfg = load_config(None, ["generate.num_samples=2", "generate.max_new_tokens=16", "generate.batch_size=2",
                             *overrides])
    stats = run_generate(cfg, talky_dir, prompts_file, out, seed=seed)
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return stats, rows


def test_stage_writes_candidates_and_sources(talky_dir, talky, prompts_file, tmp_path):
    out = tmp_path / "generate"
    stats, rows = stage(talky_dir, prompts_file, out)
    assert sorted(p.name for p in out.iterdir()) == ["DONE.json", "generations.jsonl", "stats.json"]
    assert [r["prompt_id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["sources"] == ["sample", "sample", "greedy", "dataset_chosen", "dataset_rejected"]
    assert rows[1]["sources"] == ["sample", "sample", "greedy"]
    assert rows[0]["candidates"][3:] == ["Apple.", "Car."]
    assert rows[2]["prompt"] == [{"role": "user", "content": "Count to three."}]
    for r in rows:
        assert len(r["candidates"]) == len(r["sources"]) and r["candidates"][2] == r["exploration"]
        assert len(r["finished"]) == len(r["candidates"]) and r["finished"][2] == r["exploration_finished"]
        assert all(r["finished"][3:])  # the dataset's own responses count as finished
    # The flags are the generator's (stats count the same ones), and with 16 new tokens both occur.
    flags = [f for r in rows for f in r["finished"][:3]]
    assert stats["truncated_fraction"] == flags.count(False) / 9 and True in flags and False in flags
    model, tok = talky
    # y0 is the greedy response of the start model.
    greedy = run(model, tok, prompts=[r["prompt"] for r in ROWS], greedy=True, max_new_tokens=16)
    assert [r["exploration"] for r in rows] == [g[0] for g in greedy]
    assert stats["prompts"] == 3 and stats["samples"] == 6 and stats["responses"] == 9 and stats["candidates"] == 13
    assert json.loads((out / "DONE.json").read_text()) == stats and stats["samples_per_second"] > 0
    # A redone stage (the loop redoes unfinished stages) writes the same generations and stats.
    _, again = stage(talky_dir, prompts_file, tmp_path / "again")
    assert again == rows
    for name in ("generations.jsonl", "stats.json"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_stage_options(talky_dir, prompts_file, tmp_path):
    _, rows = stage(talky_dir, prompts_file, tmp_path / "g1", "generate.use_dataset_pair=false",
                    "generate.exploration_as_candidate=false")
    assert all(r["sources"] == ["sample", "sample"] for r in rows)
    _, explore = stage(talky_dir, prompts_file, tmp_path / "g2", "generate.exploration=sample")
    assert explore[1]["sources"] == ["sample", "sample", "explore_sample"]
    # The exploration sample is a third random stream: the two samples are unchanged.
    assert [r["candidates"][:2] for r in explore] == [r["candidates"] for r in rows]
    _, only = stage(talky_dir, prompts_file, tmp_path / "g3", "generate.num_samples=0")
    assert only[0]["sources"] == ["greedy", "dataset_chosen", "dataset_rejected"]


def test_stage_rejects_bad_rows(talky_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_id": "x", "prompt": "ok"}) + "\n" + json.dumps({"prompt": "no id"}) + "\n")
    cfg = load_config(None, ["generate.max_new_tokens=4"])
    with pytest.raises(InputError, match=r"bad.jsonl:2: field 'prompt_id'"):
        run_generate(cfg, talky_dir, bad, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
