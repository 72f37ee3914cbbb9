"""Merging ingredients: MiniLM on rotten_tomatoes, every run from one shared head init.

Soup ingredients differ in learning rate and seed (data order, dropout); POINTS mixtures train
on one of ``shards`` disjoint parts of the training split; ``task=subjectivity`` gives the second
task for task arithmetic, TIES, DARE and Fisher merging, and the further-trained base of the
PortLLM experiment. ``python -m launch.merge_experiments`` trains them all and merges them.

    python -m launch.main --config configs/minilm_soup.py:lr=3e-5,seed=2 --workdir runs/merge/...
    python -m launch.main --config configs/minilm_soup.py:shard=1,shards=3 --workdir ...
"""

from configs import common, minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, lr=1e-4, seed=1, steps=150, task="sentiment", shard=0,
                            shards=1, quick=False)
    config = minilm_rotten_tomatoes.get_config(f"task={args.task}" + (",quick" if args.quick
                                                                       else ""))
    config.seed = args.seed
    config.model.init_seed = 0
    config.optim.learning_rate = args.lr
    if not args.quick:
        config.train.steps = args.steps
        config.train.eval_every = 0
        config.optim.warmup_steps = args.steps // 10
        config.checkpoint.every = args.steps
        config.checkpoint.keep = 1
    if args.shards > 1:
        config.data.train_options = dict(shard_index=args.shard, shard_count=args.shards)
    return config
