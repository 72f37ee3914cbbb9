"""DePT (Shi & Lipani, 2024) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: a
10-vector soft prompt after [CLS] and a rank-4 update of the input embeddings (per position),
the classifier and pooler trained whole, the rest frozen. Prompt + pair come to
10·384 + 4·(512 + 384) = 7,424 parameters, vanilla prompt tuning's budget at 20 vectors (7,680),
the paper's way of sizing DePT.

    python -m launch.main --config configs/minilm_dept.py --workdir runs/dept
    python -m launch.main --config configs/minilm_dept.py:quick ...   (smoke test)

Learning rates. The paper (T5, Adam-style, 40k+ steps) uses about 3e-1 for the prompt and
5e-4..1e-4 for the pair. T5's embeddings are large; MiniLM's word vectors have entries of
std ~0.056, so the prompt gets 1e-2 (a step of roughly a fifth of an entry, the regime prompt
tuning needs). The pair keeps the paper's 1e-4: at rank 4 and scale 8/sqrt(4), 250 Adam steps
move an input embedding's entries by a few hundredths at most, the scale of the position table
itself (std ~0.025).
The head takes the base rate, 1e-3.
"""

from configs import minilm_rotten_tomatoes

PROMPT_LR, PAIR_LR, HEAD_LR = 1e-2, 1e-4, 1e-3


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="dept", prompt_length=10, rank=4, alpha=8.0,
                         also_train=(r"classifier/.*", r"pooler/.*"))
    config.optim.learning_rate = HEAD_LR
    config.optim.lr_multipliers = ((r"embeddings/prompt", PROMPT_LR / HEAD_LR),
                                   (r"embeddings/position/lora_(a|b)", PAIR_LR / HEAD_LR))
    config.optim.weight_decay = ((r"(classifier|pooler)/kernel", 0.01),)
    return config
