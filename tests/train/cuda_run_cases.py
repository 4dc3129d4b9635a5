"""Child-process functions for tests/train/test_cuda_run.py: the executor's own code on fake CUDA.

Each runs under `lowmem.fakecuda` (the shim loaded before torch): FakeTensorMode with real host inputs allowed,
so the loader's real CPU batches enter as fake host tensors and only `lowmem.train.device.to_device` puts them
on `cuda`. A tensor left on the host then meets the cuda weights in some op and raises
FakeTensorDeviceMismatchError there, as it would crash a GPU run.
"""

from __future__ import annotations


def _spec(cache: str, overrides: list[str]):
    from lowmem.spec import decode_spec

    text = """
name = "fake-cuda"
[model]
preset = "tiny"
[data]
source = "builtin:kjv"
tokenizer = { kind = "train", vocab_size = 512 }
eval_rows = 8
[optimizer]
kind = "adamw"
lr = 1e-3
[train]
steps = 2
micro_batch = 4
seq_len = 64
eval_every = 0
schedule = { kind = "constant" }
"""
    return decode_spec(text, "toml", overrides=[f"data.cache_dir={cache}", *overrides])


def _all_on_cuda(tensors) -> list[str]:
    return sorted({str(t.device) for t in tensors if t is not None})


def run_combinations(cache: str, combos: list[dict]) -> list[dict]:
    """For each combo (spec overrides + strategy values): build, 2 train steps, eval, checkpoint state, generate.

    Returns, per combo, the devices the weights, gradients' owners, optimizer states and step outputs were on.
    """


    results = []
    for combo in combos:
        try:
            results.append(_run_one(cache, combo))
        except Exception as err:
            err.add_note(f"in combination {combo['name']!r}")
            raise
    return results


def _run_one(cache: str, combo: dict) -> dict:
    import msgspec
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem.data.loader import BatchLoader, split_rows
    from lowmem.nn.generate import decode_step, init_cache, prefill, sample
    from lowmem.plan import plan
    from lowmem.train.checkpoint import _by_name, _split_state
    from lowmem.train.dryrun import _FakeDataAnswers
    from lowmem.train.inputs import DeviceBatches, prepare_data
    from lowmem.train.memory import LiveTensorTracker
    from lowmem.train.session import build_training, initial_params
    from lowmem.train.step import evaluate, train_step
    from lowmem.train.strategies import param_dtype

    if True:
        spec = _spec(cache, combo.get("overrides", []))
        p = plan(spec, "h100-80gb")
        if combo.get("strategies"):
            p = msgspec.structs.replace(p, strategies=msgspec.structs.replace(p.strategies, **combo["strategies"]))
        _tokenizer, dataset = prepare_data(spec)  # real files, outside the fake mode
        train_rows, eval_rows = split_rows(len(dataset), spec.data.eval_rows, spec.train.seed)
        tracker = LiveTensorTracker()
        answers = _FakeDataAnswers(tracker, seq_len=spec.train.seq_len,
                                   n_positions=spec.train.micro_batch * spec.train.seq_len)
        loader = BatchLoader(dataset, train_rows, spec.train.micro_batch, spec.train.seed, prefetch=0)
        with FakeTensorMode(allow_non_fake_inputs=True), answers:
            params = initial_params(p, param_dtype(p.strategies))
            run = build_training(p, params, tracker)
            trainable = list(run.trainable_params.values())
            batches = DeviceBatches(loader, p.hardware.device) if not combo.get("host_batch") else loader
            for step in range(2):
                stats = train_step(step, 2, spec, run.loss_of, batches, trainable, run.optimizer, None,
                                   run.loss_scaler, split=p.strategies.micro_batch_split)
            evaluate(run.loss_of, dataset, eval_rows, spec, device=p.hardware.device)
            tensors, _skeleton = _split_state(_by_name(run.optimizer.state_dict(), list(run.trainable_params)))
            # generate's own steps (its token loop reads ids back to the host, which fake tensors cannot)
            embed = run.params["tok_embeddings"]
            with torch.no_grad():
                kv = init_cache(p.model, 1, 6, dtype=embed.dtype, device=embed.device)
                logits = prefill(run.params, torch.zeros(1, 4, dtype=torch.int64, device="cuda"), p.model, kv,
                                 adapters=run.adapters)
                generated = []
                for _ in range(2):
                    token = sample(logits)
                    generated.append(token)
                    logits = decode_step(run.params, token, p.model, kv, adapters=run.adapters)
        loader.close()
        return {
            "name": combo["name"],
            "attention_kernel": p.strategies.attention_kernel,
            "params": _all_on_cuda(run.params.values()),
            "trainable": _all_on_cuda(trainable),
            "optimizer_state": _all_on_cuda(t for t in tensors.values() if t.dim() > 0),
            "generated": _all_on_cuda([*generated, logits, *kv.keys]),
            "loss_is_float": isinstance(stats.loss, float),
        }


def host_side_failures(cache: str) -> dict:
    """A batch never copied to the device, and a parameter made on the host: each must fail where it is used."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    out = {}
    try:
        run_combinations(cache, [{"name": "host-batch", "host_batch": True}])
        out["host_batch"] = "ran"
    except FakeTensorDeviceMismatchError as err:
        out["host_batch"] = f"mismatch: {str(err)[:120]}"
    except ValueError as err:  # forward's own check: a CUDA kernel given host tokens
        out["host_batch"] = f"refused: {str(err)[:120]}"
    try:
        import msgspec
        from torch._subclasses.fake_tensor import FakeTensorMode

        from lowmem.nn import forward, init_params
        from lowmem.plan import plan

        p = plan(_spec(cache, []), "h100-80gb")
        with FakeTensorMode(allow_non_fake_inputs=True):
            params = init_params(p.model, seed=0, dtype=torch.bfloat16, device="cuda")
            params["norm"] = params["norm"].to("cpu")  # one weight left on the host
            tokens = torch.zeros(2, 16, dtype=torch.int64, device="cuda")
            forward(params, tokens, p.model, attention_kernel=msgspec.structs.asdict(p.strategies)["attention_kernel"])
        out["host_param"] = "ran"
    except FakeTensorDeviceMismatchError as err:
        out["host_param"] = f"mismatch: {str(err)[:120]}"
    return out
