"""What lowmem ships, as tables for `lowmem presets` and `lowmem recipes` (like torchtune's `tune ls`)."""

from lowmem.recipes import list_recipes


def format_count(n: int) -> str:
    """A parameter count in the way model names give it: 5.48M, 1.24B."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def preset_table() -> str:
    """One line per model preset: name, parameters (analytic, tied output once), family and shapes."""
    from lowmem.nn.config import PRESETS, count_params

    configs = {name: make() for name, make in PRESETS.items()}
    fam = max(len(cfg.family) for cfg in configs.values())  # gemma3_text, the longest today, still fits 100 columns
    header = (f"{'preset':<17} {'params':>8}  {'family':<{fam}} {'layers':>6} {'dim':>5} {'heads':>7} {'ffn':>6} "
              f"{'vocab':>7} {'max seq':>7}")
    lines = [header]
    for name, cfg in configs.items():
        heads = f"{cfg.n_heads}/{cfg.n_kv_heads}"
        lines.append(f"{name:<17} {format_count(count_params(cfg)):>8}  {cfg.family:<{fam}} {cfg.n_layers:>6} "
                     f"{cfg.dim:>5} {heads:>7} {cfg.ffn_dim:>6} {cfg.vocab_size:>7} {cfg.max_seq_len:>7}")
    lines.append("heads: query/key-value. A spec names one as model.preset (random init from the config).")
    return "\n".join(lines)


def recipe_table() -> str:
    """One line per shipped recipe (name and description), then how to copy one."""
    recipes = list_recipes()
    width = max(len(r.name) for r in recipes)
    lines = [f"{r.name:<{width}}  {r.description}" for r in recipes]
    lines.append("`lowmem init NAME [DIR]` copies one to DIR/NAME.toml; its header says how to plan and run it.")
    return "\n".join(lines)
