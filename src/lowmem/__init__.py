"""lowmem: fine-tune LLMs with PyTorch in as little memory as the job allows.

The three steps of a run are the public API::

    spec = load_spec("run.toml", overrides=["train.steps=100"])
    p = plan(spec)                  # pure: picks strategies, predicts memory; allocates nothing
    result = execute(p, "runs/x")   # runs exactly that plan

`lowmem.spec` is importable without torch; `plan` and `execute` import it lazily.
"""

from lowmem.spec import RunSpec, load_spec

__version__ = "0.1.0"


def plan(spec, hardware=None, world_size: int = 1):
    """Compile a RunSpec into a Plan for `world_size` processes (see `lowmem.plan.plan`)."""
    from lowmem.plan import plan as _plan

    return _plan(spec, hardware, world_size)


def execute(plan_or_spec, out_dir=None, **kwargs):
    """Run a Plan (or plan a RunSpec first) and return the run's result (see `lowmem.train.execute`)."""
    from lowmem.train import execute as _execute

    return _execute(plan_or_spec, out_dir, **kwargs)


__all__ = ["RunSpec", "execute", "load_spec", "plan", "__version__"]
