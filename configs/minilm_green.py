"""GreenTrainer (Huang et al., 2023, "Towards Green AI in Fine-tuning Large Language Models via
Adaptive Backpropagation") on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: the
tensors with the most loss decrease per backward FLOP train, with the classifier, under a step
budget of ``budget`` x full fine-tuning's FLOPs (XLA); 150 steps at full fine-tuning's learning
rate, like the merge runs (``minilm_soup.py``).

The run chooses the tensors before its first step (GreenTrainer.prepare: importance from
``batches`` training batches, costs from the step's autodiff graph, checked by XLA), about a
minute on CPU.

    python -m launch.main --config configs/minilm_green.py:budget=0.5 --workdir runs/green_50
    python -m launch.main --config configs/minilm_green.py:quick ...   (smoke test)
"""

from configs import common, minilm_soup


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, lr=1e-4, seed=1, steps=150, task="sentiment", budget=0.5,
                            batches=4, quick=False)
    config = minilm_soup.get_config(f"lr={args.lr},seed={args.seed},steps={args.steps},"
                                    f"task={args.task}" + (",quick" if args.quick else ""))
    config.method = dict(name="green", flops_budget=args.budget,
                         importance_batches=1 if args.quick else args.batches, selected=())
    return config
