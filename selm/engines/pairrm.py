"""PairRM: llm-blender's pairwise reward model (a DeBERTa-v3-large cross-encoder), our own code.

The SELM authors rank each prompt's candidates {greedy response, dataset chosen, dataset rejected}
with ``llm_blender.Blender().loadranker("llm-blender/PairRM")`` and ``blender.rank``
(scripts/online_feedback.py in github.com/shenao-zhang/SELM). llm-blender 0.0.2 does not import
with transformers 5, so this module re-implements what that call computes, following the
llm-blender sources (github.com/yuchenlin/LLM-Blender: llm_blender/pair_ranker/ranker.py
``CrossCompareReranker._forward`` / ``_full_predict``, pair_ranker/pairrm.py ``DebertaV2PairRM``,
pair_ranker/collator.py ``CrossCompareCollator``, gpt_eval/utils.py ``get_scores_from_cmps``) and the
model cards of llm-blender/PairRM and llm-blender/PairRM-hf. No code is copied.

One comparison (prompt x, candidates a, b) is one sequence of three segments, each wrapped in the
tokenizer's [CLS] ... [SEP]::

    [CLS] <|source|> x [SEP] [CLS] <|candidate1|> a [SEP] [CLS] <|candidate2|> b [SEP]

Lengths (collator / PairRM-hf README ``tokenize_pair``): the source segment is cut at its END to
``source_max_length`` tokens (1224 for PairRM); each candidate segment gets
``(source_max_length + 2 * candidate_max_length - len(source segment)) // 2`` tokens (412 + what the
source left unused, split in two) and is cut at its end. We apply this per comparison, as
``tokenize_pair`` does; the collator took the source length of the longest prompt in its batch,
which made a score depend on its batch neighbours.

Head: the encoder's last hidden states at the three marker tokens; ``head([h_src; h_a])`` and
``head([h_src; h_b])`` with head = Dropout, Linear(2H, H), Tanh, Dropout, Linear(H, n_tasks); the
comparison logit is the mean over tasks of their difference (> 0: a beats b).

Ranking k candidates (``_full_predict`` + ``get_scores_from_cmps``, policy "max_logits"): every
ordered pair (i, j), i != j, is compared, so each pair is seen in both orders, and

    score_i = (1 / k) * sum over j != i of (L[i, j] - L[j, i])

i.e. the mean over the other candidates of the log-odds that i wins, with the two presentation
orders combined (cancelling position bias). A single candidate scores 0.

Checkpoint folders (``rank.model``), weights in safetensors only:

- llm-blender/PairRM-hf: config.json is a DeBERTa-v2 config with PairRM's extra keys (n_tasks,
  drop_out, source_prefix_id, cand1_prefix_id, cand2_prefix_id), model.safetensors, tokenizer.
- llm-blender/PairRM: config.json is llm-blender's RankerConfig (ranker_type "pairranker",
  model_name "microsoft/deberta-v3-large", source_maxlength 1224, candidate_maxlength 412),
  model.safetensors, tokenizer. The backbone's config is not in the folder; it is DeBERTa-v3-large's
  (below), with the vocabulary size read from the weights.

Both hold the same state dict (``pretrained_model.*`` for the encoder, ``head_layer.*`` for the
head; llm-blender's pairrm_to_hf.ipynb loads one into the other), so the module below keeps those
names. On a GPU the model runs in float16, as llm-blender does (RankerConfig.fp16); on a CPU in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from selm.chat import Messages
from selm.config import RankConfig
from selm.io import InputError

SOURCE, CAND1, CAND2, CAND = "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"
MARKERS = (SOURCE, CAND1, CAND2, CAND)

# PairRM's lengths (its ranker_config.json; the PairRM-hf README's tokenize_pair defaults).
SOURCE_MAX_LENGTH = 1224
CANDIDATE_MAX_LENGTH = 412

# microsoft/deberta-v3-large's config.json (the backbone named by llm-blender/PairRM's config.json).
DEBERTA_V3_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=0,
    initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=True, max_relative_positions=-1,
    position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
    position_biased_input=False, pad_token_id=0,
)

BIN_HELP = ("convert it once: python -c \"import torch, safetensors.torch as st; "
            "st.save_file({{k: v.contiguous() for k, v in torch.load('{bin}', weights_only=True).items()}}, "
            "'{dir}/model.safetensors')\"")


def source_text(prompt: Messages) -> str:
    """The text PairRM reads as the source. The authors pass the UltraFeedback prompt string, i.e. the
    one user turn; a conversation (or a system message) becomes "ROLE: content" lines, the form
    llm-blender's compare_conversations gives multi-turn inputs."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt)


def build_pairrm_module(config, n_tasks: int, dropout: float):
    """PairRM's torch module (DeBERTa-v2 encoder + pairwise head) for a DeBERTa-v2 `config`, randomly initialised."""
    import torch
    from torch import nn
    from transformers import DebertaV2Model

    class PairRMModule(nn.Module):
        """Encoder + head; attribute names fixed by the checkpoint's keys (pretrained_model.*, head_layer.*)."""

        def __init__(self):
            super().__init__()
            h = config.hidden_size
            self.pretrained_model = DebertaV2Model(config)
            self.head_layer = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * h, h), nn.Tanh(), nn.Dropout(dropout),
                                            nn.Linear(h, n_tasks))

        def forward(self, input_ids, attention_mask, marks):
            """input_ids, attention_mask: (B, T); marks: (B, 3) positions of the three markers -> (B,) logits."""
            hidden = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            src, a, b = (hidden[rows, marks[:, k]] for k in range(3))  # each (B, H)
            left = self.head_layer(torch.cat([src, a], dim=-1))  # (B, n_tasks)
            right = self.head_layer(torch.cat([src, b], dim=-1))
            return (left - right).mean(dim=-1)

    return PairRMModule()


def _read_json(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{key}: {path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{key}: {path}: expected a JSON object")
    return data


def _weights(path: Path, key: str) -> dict:
    """The state dict of the folder's safetensors files; pickled weights are refused with the fix."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        if pickled:
            raise InputError(f"{key}: {path}: only pickled weights ({pickled[0].name}); selm loads safetensors only; "
                             + BIN_HELP.format(bin=pickled[0], dir=path))
        raise InputError(f"{key}: {path}: no .safetensors weights found (a PairRM folder holds model.safetensors)")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _config(path: Path, raw: dict, state: dict, key: str):
    """(DebertaV2Config, n_tasks, dropout, source_max_length, candidate_max_length) for either layout."""
    from transformers import DebertaV2Config

    src_len = int(raw.get("source_maxlength") or raw.get("source_max_length") or SOURCE_MAX_LENGTH)
    cand_len = int(raw.get("candidate_maxlength") or raw.get("candidate_max_length") or CANDIDATE_MAX_LENGTH)
    n_tasks, dropout = int(raw.get("n_tasks", 1)), float(raw.get("drop_out", 0.05))
    if "ranker_type" in raw:  # llm-blender's own layout
        if raw["ranker_type"] != "pairranker":
            raise InputError(f"{key}: {path}: ranker_type {raw['ranker_type']!r} is not llm-blender's 'pairranker'")
        if "deberta-v3-large" not in str(raw.get("model_name", "")):
            raise InputError(f"{key}: {path}: backbone {raw.get('model_name')!r} is not microsoft/deberta-v3-large; "
                             "use a folder whose config.json is the backbone's (the PairRM-hf layout)")
        emb = state.get("pretrained_model.embeddings.word_embeddings.weight")
        if emb is None:
            raise InputError(f"{key}: {path}: no pretrained_model.embeddings.word_embeddings.weight in the weights")
        config = DebertaV2Config(**DEBERTA_V3_LARGE, vocab_size=int(emb.shape[0]))
    elif raw.get("model_type") == "deberta-v2":
        config = DebertaV2Config.from_pretrained(str(path))
    else:
        raise InputError(f"{key}: {path}: not a PairRM checkpoint (config.json is neither llm-blender's RankerConfig "
                         "nor a DeBERTa-v2 config)")
    if src_len < 3 or cand_len < 3:
        raise InputError(f"{key}: {path}: source/candidate max lengths must be >= 3")
    return config, n_tasks, dropout, src_len, cand_len


class PairRM:
    """A loaded PairRM: ``compare`` gives logits for (x, a, b) triples, ``rank_scores`` the per-candidate
    scores of the module docstring. Errors start with ``key`` (e.g. "rank.model")."""

    def __init__(self, path: str | Path, key: str = "rank.model", batch_size: int = 8, device=None):
        import torch

        from selm.models import default_device, quiet_transformers

        path = Path(path)
        if not (path / "config.json").is_file():
            raise InputError(f"{key}: {path}: no config.json (expected a PairRM folder: config.json, "
                             "model.safetensors and the tokenizer files)")
        raw = _read_json(path / "config.json", key)
        state = _weights(path, key)
        config, n_tasks, dropout, self.source_max_length, self.candidate_max_length = _config(path, raw, state, key)
        quiet_transformers()
        self.tokenizer = self._tokenizer(path, key)
        self.marker_ids = self._marker_ids(config, key, path)
        module = build_pairrm_module(config, n_tasks, dropout)
        missing, unexpected = module.load_state_dict(state, strict=False)
        # Older transformers saved the position_ids buffer; it carries no weights.
        unexpected = [k for k in unexpected if not k.endswith("position_ids")]
        if missing or unexpected:
            parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
                [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
            what = "; ".join(parts)
            raise InputError(f"{key}: {path}: the weights do not fit PairRM's DeBERTa-v2 + head ({what})")
        self.device = torch.device(device) if device is not None else default_device()
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = module.to(self.device, dtype).eval()
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @staticmethod
    def _tokenizer(path: Path, key: str):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise InputError(f"{key}: {path}: cannot load the tokenizer: {type(e).__name__}: {e}") from None
        if tok.cls_token_id is None or tok.sep_token_id is None:
            raise InputError(f"{key}: {path}: the tokenizer has no [CLS]/[SEP] tokens (PairRM's is DeBERTa-v3's)")
        return tok

    def _marker_ids(self, config, key: str, path: Path) -> dict[str, int]:
        ids = {}
        for m in MARKERS:
            i = self.tokenizer.convert_tokens_to_ids(m)
            if i is None or i == self.tokenizer.unk_token_id or self.tokenizer.convert_ids_to_tokens(i) != m:
                raise InputError(f"{key}: {path}: the tokenizer lacks PairRM's token {m}")
            ids[m] = int(i)
        for m, attr in ((SOURCE, "source_prefix_id"), (CAND1, "cand1_prefix_id"), (CAND2, "cand2_prefix_id")):
            stated = getattr(config, attr, None)
            if stated is not None and int(stated) != ids[m]:
                raise InputError(f"{key}: {path}: config.json says {attr}={stated} but the tokenizer has {m}={ids[m]}")
        return ids

    # -- inputs ----------------------------------------------------------------------------------

    def _clean(self, text: str) -> str:
        # The collator replaces the separator's text by a space; we do the same for [CLS] and the
        # four markers, so a response cannot forge a segment boundary or a marker.
        for t in (self.tokenizer.sep_token, self.tokenizer.cls_token, *MARKERS):
            text = text.replace(t, " ")
        return text

    def _segment(self, marker: str, text: str, limit: int) -> list[int]:
        """[CLS] <marker> text [SEP], cut at the end to `limit` tokens (the marker is always kept)."""
        body = self.tokenizer(marker + self._clean(text), add_special_tokens=False, verbose=False)["input_ids"]
        return [self.tokenizer.cls_token_id] + body[:limit - 2] + [self.tokenizer.sep_token_id]

    def encode(self, source: str, a: str, b: str) -> tuple[list[int], tuple[int, int, int]]:
        """Token ids of one comparison and the positions of its three markers."""
        src = self._segment(SOURCE, source, self.source_max_length)
        budget = (self.source_max_length + 2 * self.candidate_max_length - len(src)) // 2
        seg_a = self._segment(CAND1, a, budget)
        seg_b = self._segment(CAND2, b, budget)
        return src + seg_a + seg_b, (1, len(src) + 1, len(src) + len(seg_a) + 1)

    # -- scoring ---------------------------------------------------------------------------------

    def compare(self, triples: Sequence[tuple[str, str, str]]) -> list[float]:
        """Logit that a beats b for each (source, a, b), in input order; batched longest first."""
        import torch

        rows = [self.encode(*t) for t in triples]
        out = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda k: -len(rows[k][0]))
        with torch.no_grad():
            for s in range(0, len(order), self.batch_size):
                chunk = order[s:s + self.batch_size]
                width = max(len(rows[k][0]) for k in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # (B, T), right-padded
                mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
                for r, k in enumerate(chunk):
                    ids[r, :len(rows[k][0])] = torch.tensor(rows[k][0])
                    mask[r, :len(rows[k][0])] = 1
                marks = torch.tensor([rows[k][1] for k in chunk], dtype=torch.long)  # (B, 3)
                logits = self.model(ids.to(self.device), mask.to(self.device), marks.to(self.device))
                for r, k in enumerate(chunk):
                    out[k] = float(logits[r].float())
        return out

    def comparison_matrices(self, sources: Sequence[str],
                            candidates: Sequence[Sequence[str]]) -> list[list[list[float]]]:
        """L[p][i][j] = logit that candidate i beats j for prompt p (both orders of every pair; diagonal 0)."""
        triples, where = [], []
        for p, (src, cands) in enumerate(zip(sources, candidates)):
            for i, a in enumerate(cands):
                for j, b in enumerate(cands):
                    if i != j:
                        triples.append((src, a, b))
                        where.append((p, i, j))
        logits = self.compare(triples)
        mats = [[[0.0] * len(c) for _ in c] for c in candidates]
        for (p, i, j), v in zip(where, logits):
            mats[p][i][j] = v
        return mats

    def rank_scores(self, sources: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """score_i = (1/k) * sum_j (L[i][j] - L[j][i]) per prompt (llm-blender's "max_logits")."""
        out = []
        for m in self.comparison_matrices(sources, candidates):
            k = len(m)
            out.append([sum(m[i][j] - m[j][i] for j in range(k)) / k for i in range(k)])
        return out

    def close(self) -> None:
        self.model = None


def load_pairrm(cfg: RankConfig, key: str) -> Any:
    """PairRM for a RankConfig; errors name ``{key}.model``."""
    from selm.models import local_model_dir

    if not cfg.model:
        raise InputError(f"{key}.model: required when {key}.kind is 'pairrm' (the PairRM checkpoint folder)")
    path = local_model_dir(cfg.model, f"{key}.model", cfg.revision)
    return PairRM(path, key=f"{key}.model", batch_size=cfg.batch_size)
