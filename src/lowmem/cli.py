"""The `lowmem` command: a thin typer layer over load_spec / plan / execute. It holds no logic of its own."""

import sys
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from lowmem.spec import SpecError, load_spec

app = typer.Typer(
    name="lowmem",
    help=(
        "Fine-tune LLMs in as little memory as the job allows, and see the cost before the run.\n\n"
        "Write a spec (TOML/YAML/JSON), then: `lowmem plan SPEC` shows the strategies chosen and the "
        "memory they need; `lowmem execute SPEC` runs it. Start with `lowmem init quickstart` (`lowmem recipes` "
        "lists the specs lowmem ships)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SpecArg = Annotated[Path, typer.Argument(help="Spec file (.toml, .yaml, .json).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a spec field: --set train.steps=100 (repeatable).",
                 show_default=False),
]
HardwareOpt = Annotated[
    str | None,
    typer.Option("--hardware", help="Plan for a named profile (h100-80gb, a100-40gb, a100-80gb, rtx4090-24gb, "
                 "a6000-48gb, cpu) or a profile file (my-box.toml: name, memory, host_ram, bf16_tflops, "
                 "fp32_tflops, memory_bandwidth_gbps, ...) instead of this machine.", show_default=False),
]
HostRamOpt = Annotated[
    str | None,
    typer.Option("--host-ram", help="The host RAM to plan with (e.g. 64GiB) instead of the profile's; at most half "
                 "of it is planned as pinned memory.", show_default=False),
]


def _print_version(value: bool) -> None:
    """`--version`: the installed distribution's version (lowmem.__version__ when run from a source tree)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"lowmem {version('lowmem')}")
    except PackageNotFoundError:
        import lowmem

        typer.echo(f"lowmem {lowmem.__version__}")
    raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print lowmem's version and exit.")] = False) -> None:
    """Fine-tune LLMs in as little memory as the job allows, and see the cost before the run."""


class _UserError(Exception):
    """Raised for bad input; printed as one line without a traceback."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _user_errors(fn):
    """Run a command, turning bad-input errors into one clear message and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # PlanError is a ValueError: caught without importing the planner (and torch) for `validate`
        try:
            return fn(*args, **kwargs)
        except (_UserError, SpecError, ValueError, FileNotFoundError, msgspec.ValidationError) as err:
            _fail(str(err))

    return wrapper


@app.command()
@_user_errors
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec file: types, ranges and cross-field rules. Prints the spec with defaults filled in."""
    from lowmem.spec import encode_spec

    run = load_spec(spec, set_ or [])
    typer.echo(encode_spec(run, "toml").decode())
    typer.secho(f"{spec}: valid", fg=typer.colors.GREEN, err=True)


@app.command("plan")
@_user_errors
def plan_cmd(
    spec: SpecArg,
    set_: SetOpt = None,
    hardware: HardwareOpt = None,
    host_ram: HostRamOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (execute accepts it back).")] = False,
    maximize: Annotated[str | None, typer.Option(
        "--maximize", help="Find the largest train.micro_batch ('batch') or train.seq_len ('seq_len') that fits "
        "the budget.", show_default=False)] = None,
    png: Annotated[Path | None, typer.Option(
        "--png", help="Also write a chart of the memory breakdown of the plan and its alternatives.",
        show_default=False)] = None,
    trace: Annotated[bool, typer.Option(
        "--trace", help="Also run the planned training step on fake tensors (no memory used) and show the "
        "traced peak beside the analytic one.")] = False,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, help="Plan for this many data-parallel processes (torchrun --nproc_per_node N, FSDP2): "
        "memory per process, tokens per step over all.")] = 1,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Give every decision's reason in full and say what the tags and abbreviations mean.")
    ] = False,
) -> None:
    """Choose the memory strategies for a spec and print the dry-run memory report. Allocates nothing."""
    from lowmem.plan import plan, render_plan
    from lowmem.plan.planner import maximize as maximize_plan

    if trace and nproc > 1:
        raise _UserError("--trace runs one process's step on fake tensors, unsharded; use it without --nproc")
    from lowmem.plan.hardware import resolve_hardware

    run = load_spec(spec, set_ or [])
    hardware = resolve_hardware(hardware, host_ram)
    if maximize == "batch":  # the data caps the micro-batch: one step takes at most its rows
        from lowmem.train.inputs import training_rows

        p = maximize_plan(run, maximize, hardware, nproc, data_rows=training_rows(run))
    else:
        p = maximize_plan(run, maximize, hardware, nproc) if maximize else plan(run, hardware, nproc)
    if png is not None and _can_chart("--png"):
        from lowmem.plan.chart import write_memory_chart

        write_memory_chart(p, png)
        typer.secho(f"wrote {png}", err=True)
    if json_:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(p), indent=2).decode() + "\n")
    else:
        typer.echo(render_plan(p, explain=explain))
    if trace:
        from lowmem.train.dryrun import render_trace_comparison, trace_in_fake_cuda, trace_memory

        typer.echo("")
        traced = trace_in_fake_cuda(p) if p.hardware.device == "cuda" else trace_memory(p)
        typer.echo(render_trace_comparison(p, traced), err=json_)


@app.command()
@_user_errors
def execute(
    spec_or_plan: Annotated[Path, typer.Argument(
        help="A spec file, a plan.json from `lowmem plan --json`, or a run directory (with --resume).",
        show_default=False)],
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default: the spec's output.dir).",
                                             show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress line.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run directory's newest checkpoint.")]
    = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the run already in the run directory "
                                            "(once this one's data is ready) and start again.")] = False,
    cap_memory: Annotated[str | None, typer.Option(
        "--cap-memory", help="Enforce a cap on live tensor bytes, e.g. 2GiB: past it a step runs out of memory as "
        "on a full GPU (rehearses memory.on_oom on any machine).", show_default=False)] = None,
) -> None:
    """Run a spec (planned for this machine first) or a saved plan, and write the run directory.

    Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and stops; `--resume` continues it.
    """
    from lowmem.plan import render_plan
    from lowmem.train import execute as run
    from lowmem.train.distributed import launch_rank
    from lowmem.train.oom import OutOfMemoryStop

    p, out = _plan_to_execute(spec_or_plan, set_ or [], out)
    secondary = launch_rank() != 0  # under torchrun, rank 0 alone speaks
    if not quiet and not secondary:
        typer.echo(render_plan(p))
        typer.echo("")
    cap = _size_option("--cap-memory", cap_memory)
    try:
        result = run(p, out, progress=not quiet, resume=resume, overwrite=overwrite, cap_memory_bytes=cap)
    except OutOfMemoryStop as err:
        _fail(str(err))
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without the checkpoint the first one asks for
        _stopped_at_once(Path(out or p.spec.out_dir))
    if not secondary:
        _print_result(result)


def _stopped_at_once(out: Path) -> None:
    """What a run stopped by a second Ctrl-C leaves: its newest checkpoint, or none; exits 130."""
    from lowmem.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(out)
    kept = (f"the newest checkpoint is {newest}: `lowmem execute {out} --resume` continues from it" if newest
            else "no checkpoint was written yet, so its progress is lost (output.save_every keeps some)")
    typer.echo(f"\nstopped at once by a second interrupt, without a checkpoint of this step; {kept}", err=True)
    raise typer.Exit(code=130)


def _plan_to_execute(spec_or_plan: Path, set_: list[str], out: Path | None):
    """The plan `lowmem execute` runs (a spec is planned here), checked against this machine, and its --out."""
    from lowmem.plan import plan
    from lowmem.train.distributed import launch_world_size
    from lowmem.train.loop import check_executable

    if spec_or_plan.is_dir():
        if not (spec_or_plan / "plan.json").is_file():
            raise _UserError(f"{spec_or_plan} is a directory without plan.json; give a spec file or a run directory")
        out = out or spec_or_plan
        spec_or_plan = spec_or_plan / "plan.json"
    # a spec is planned for the processes torchrun started (WORLD_SIZE); a plan.json must have been made for them
    p = (_load_plan(spec_or_plan, set_) if _is_plan(spec_or_plan)
         else plan(load_spec(spec_or_plan, set_), world_size=launch_world_size()))
    check_executable(p)
    return p, out


def _size_option(flag: str, value: str | None) -> int | None:
    """A size option such as `--cap-memory 2GiB` in bytes (None when not given)."""
    if value is None:
        return None
    from lowmem.spec.units import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as err:
        raise _UserError(f"{flag} {value!r}: {err}") from None


def _print_result(result) -> None:
    """What a finished (or interrupted) run says: losses, speed, planned versus measured memory, where it is."""
    import json

    from lowmem.train import describe_memory

    typer.echo("")
    if result.interrupted:
        typer.echo(f"interrupted after step {result.steps}: checkpoint written; continue with "
                   f"`lowmem execute {result.out_dir} --resume`")
        raise typer.Exit(code=130)
    typer.echo(f"done: {result.steps} steps, loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
               + (f", eval loss {result.eval_loss:.3f}" if result.eval_loss is not None else "")
               + f", {result.tokens_per_s:,.0f} tokens/s")
    typer.echo(describe_memory(json.loads((Path(result.out_dir) / "memory.json").read_text())))
    typer.echo(f"run directory: {result.out_dir}" + (f"  (model: {result.model_dir})" if result.model_dir else ""))


@app.command()
@_user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (or an HF model + adapter).",
                                            show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Where to write the HF-format model.", show_default=False)],
    merge: Annotated[bool, typer.Option("--merge", help="Merge LoRA/DoRA adapters into the base weights.")] = False,
) -> None:
    """Write a run's model as one Hugging Face checkpoint; with --merge, adapters are merged into the base."""
    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.nn import save_hf
    from lowmem.nn.generate import find_model_files, load_model
    from lowmem.nn.lora import merge_adapters
    from lowmem.train.saving import copy_tokenizer, staged

    if Path(out).exists():
        raise _UserError(f"--out {out} exists; give a new directory (nothing was written)")
    files = find_model_files(run_dir)
    cfg, params, settings = load_model(files)
    if settings is not None and not merge:
        raise _UserError(f"{run_dir} holds adapters ({files.adapter_dir}); pass --merge to fold them into the "
                         "base weights, or use the PEFT adapter directory as it is")
    if settings is not None:
        params = merge_adapters(params, settings)
    with staged(Path(out)) as staging:  # weights and tokenizer appear together, in one rename
        save_hf(params, cfg, staging)
        copy_tokenizer(load_tokenizer(files.tokenizer_path), staging)
    typer.echo(f"wrote {out}" + (" (adapters merged)" if settings is not None else ""))


@app.command()
@_user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (with metrics.jsonl).", show_default=False)],
    png: Annotated[Path | None, typer.Option("--png", help="Chart file (default RUN_DIR/report.png).",
                                             show_default=False)] = None,
) -> None:
    """Summarize a run: loss, learning rate, speed, planned vs measured memory; a PNG chart incl. memory over time."""
    import json

    from lowmem.train import describe_memory
    from lowmem.train.report import write_run_chart
    from lowmem.train.rundir import read_metrics

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise _UserError(f"{run_dir}: no metrics.jsonl; give the directory `lowmem execute` wrote")
    records = read_metrics(metrics)
    if not records:
        raise _UserError(f"{metrics} is empty: the run logged no step yet")
    last = records[-1]
    evals = [r for r in records if "eval_loss" in r]
    typer.echo(f"{run_dir}: {last['step']} steps, loss {records[0]['loss']:.4f} -> {last['loss']:.4f}"
               + (f", eval {evals[-1]['eval_loss']:.4f}" if evals else "")
               + f", {last['tokens_per_s']:,.0f} tokens/s, {last['elapsed_s']:.0f} s")
    memory_file = run_dir / "memory.json"
    memory = json.loads(memory_file.read_text()) if memory_file.is_file() else None
    if memory:
        typer.echo(describe_memory(memory))
    target = png or run_dir / "report.png"
    if _can_chart(str(target)):
        write_run_chart(records, target, title=run_dir.name, memory=memory)
        typer.echo(f"wrote {target}")


def _can_chart(chart: str) -> bool:
    """Whether matplotlib is there to draw `chart`; if not, one line says how to get it (the text output stands)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        typer.echo(f"no chart ({chart}): matplotlib is not installed; `pip install 'lowmem[plot]'` adds it",
                   err=True)
        return False
    return True


@app.command()
@_user_errors
def runs(
    root: Annotated[Path, typer.Argument(help="A run directory, or a directory of them (searched below).",
                                         show_default=False)] = Path("runs"),
) -> None:
    """List the runs under a directory: state (running, finished, stopped at step N, failed), newest
    checkpoint, last logged step and loss."""
    from lowmem.train.rundir import find_runs, run_status

    if not root.is_dir():
        raise _UserError(f"{root}: no such directory; give the directory your runs' --out point into")
    found = find_runs(root)
    if not found:
        typer.echo(f"no runs under {root} (a run directory holds plan.json)")
        return
    statuses = [run_status(path) for path in found]
    width = max(len(str(s.path)) for s in statuses)
    typer.echo(f"{'run':<{width}}  {'state':<34} {'step':>7} {'loss':>8}  newest checkpoint")
    for s in statuses:
        loss = f"{s.final_loss:.4f}" if s.final_loss is not None else "-"
        typer.echo(f"{str(s.path):<{width}}  {s.state:<34} {s.steps_logged:>7} {loss:>8}  {s.newest_checkpoint or '-'}")


data_app = typer.Typer(help="Build and look at the tokenized, packed data cache of a spec.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
@_user_errors
def data_prepare(spec: SpecArg, set_: SetOpt = None) -> None:
    """Tokenize and pack a spec's data into its cache ahead of training (reused by execute)."""
    from lowmem.spec import format_bytes
    from lowmem.train.inputs import prepare_data

    def show(records: int, read: int, total: int) -> None:
        share = read / total if total else 1.0
        bar = "#" * int(30 * share)
        sys.stderr.write(f"\r[{bar:<30}] {share:6.1%}  {records:,} records  {format_bytes(read)}")
        sys.stderr.flush()

    run = load_spec(spec, set_ or [])
    _, dataset = prepare_data(run, progress=show)
    sys.stderr.write("\n")
    meta = dataset.metadata
    typer.echo(f"{dataset.path}: {len(dataset):,} rows of {dataset.seq_len} tokens")
    for key in ("n_documents", "n_tokens", "n_trained", "n_padding", "padding_fraction", "n_skipped", "n_split",
                "n_truncated", "n_dropped"):
        if key in meta:
            value = meta[key]
            typer.echo(f"  {key:<17} {value:.2%}" if key == "padding_fraction" else f"  {key:<17} {value:,}")


@data_app.command("inspect")
@_user_errors
def data_inspect(
    spec: SpecArg,
    set_: SetOpt = None,
    rows: Annotated[int, typer.Option("--rows", "-n", help="How many packed rows to show.")] = 2,
) -> None:
    """Decode a few packed rows: one document per line, [[...]] marks tokens the loss does not train on."""
    from lowmem.data import inspect_rows
    from lowmem.train.inputs import prepare_data

    tokenizer, dataset = prepare_data(load_spec(spec, set_ or []))
    typer.echo(inspect_rows(dataset.path, tokenizer, n=rows))


def _is_plan(path: Path) -> bool:
    if path.suffix.lower() != ".json":
        return False
    try:
        head = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return False
    return isinstance(head, dict) and "format" in head and "strategies" in head


def _load_plan(path: Path, overrides: list[str]):
    from lowmem.plan import PLAN_FORMAT, Plan

    if overrides:
        raise _UserError(f"{path}: --set cannot change a saved plan; re-plan the spec with --set instead")
    try:
        p = msgspec.json.decode(path.read_bytes(), type=Plan)
    except msgspec.ValidationError as err:
        raise ValueError(f"{path}: not a lowmem plan ({err}); make one with `lowmem plan SPEC --json`") from None
    if p.format != PLAN_FORMAT:
        raise ValueError(f"{path}: plan format {p.format!r}; this lowmem reads {PLAN_FORMAT!r}. Re-plan the spec.")
    return p


@app.command("generate")
@_user_errors
def generate_cmd(
    model_dir: Annotated[Path, typer.Argument(
        help="A finished run directory (its model/, or base/ + adapter/) or an HF model directory with its "
             "tokenizer (tokenizer.model or tokenizer.json).", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.", show_default=False)],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to add.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy.")] = 0.0,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Sample from the K most likely tokens.",
                                              show_default=False)] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Sample from the smallest set of tokens "
                                                "whose probability reaches P.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling generator.")] = 0,
) -> None:
    """Continue a prompt with a trained model and print the continuation."""
    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.nn.generate import find_model_files, generate, load_model

    files = find_model_files(model_dir)
    tokenizer = load_tokenizer(files.tokenizer_path)
    cfg, params, adapters = load_model(files)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # training rows start with bos too (if any)
    prompt_ids = bos + tokenizer.encode([prompt])[0]
    new_ids = generate(params, cfg, [prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, eos_id=tokenizer.eos_id, adapters=adapters)[0]
    typer.echo(tokenizer.decode([t for t in new_ids if t != tokenizer.eos_id]))


@app.command()
@_user_errors
def download(
    repo_id: Annotated[str, typer.Argument(help="Hugging Face model repo: org/name (or org/name@revision).",
                                           show_default=False)],
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit (default: main).",
                                                 show_default=False)] = None,
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Glob of files to fetch (repeatable); replaces the default: *.json, *.safetensors, "
        "tokenizer.model, original/tokenizer.model.", show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", help="Glob of files to skip (repeatable).", show_default=False)] = None,
    local_dir: Annotated[Path | None, typer.Option(
        "--local-dir", help="Put the files here instead of the Hugging Face cache.", show_default=False)] = None,
) -> None:
    """Download a model repo (safetensors, configs, tokenizer) into the Hugging Face cache; needs network.

    A spec then names it as model.path = "org/name". Private and gated repos use HF_TOKEN or `hf auth login`.
    """
    from lowmem.nn.hub import download as download_repo

    path = download_repo(repo_id, revision=revision, include=include, exclude=exclude, local_dir=local_dir)
    typer.echo(f"{repo_id}: {path}")


@app.command()
def presets() -> None:
    """List the model presets (model.preset) with their parameter counts and shapes."""
    from lowmem.catalog import preset_table

    typer.echo(preset_table())


@app.command()
def recipes() -> None:
    """List the example specs lowmem ships, one line each; `lowmem init NAME` copies one."""
    from lowmem.catalog import recipe_table

    typer.echo(recipe_table())


@app.command()
@_user_errors
def init(
    recipe: Annotated[str, typer.Argument(help="A recipe from `lowmem recipes`, e.g. quickstart.",
                                          show_default=False)],
    directory: Annotated[Path, typer.Argument(help="Where to write RECIPE.toml (made if missing).")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite RECIPE.toml if it exists.")] = False,
) -> None:
    """Copy a shipped recipe to DIRECTORY/RECIPE.toml, to edit and run: `lowmem plan RECIPE.toml`."""
    from lowmem.recipes import copy_recipe

    target = copy_recipe(recipe, directory, force=force)
    typer.echo(f"wrote {target}; next: `lowmem plan {target}`, then `lowmem execute {target}`")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except _UserError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
