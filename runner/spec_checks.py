"""Spec checks beyond one field at a time: duplicate YAML keys, output budgets against the engines'
context length, pool sizes against the pair caps, and primary judges against what the suites score.

`runner.spec.load_spec` and `parse_spec` call them; each returns (YAML path, message) problems, so
`valind validate` lists them with every other problem.
"""
from __future__ import annotations

import re
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any

import yaml

from evaluation.benchmarks import JUDGE as QA_JUDGE, SUITE as QA_SUITE
from evaluation.errors import short_repr
from evaluation.suites import registry as suite_registry
from runner.spec_views import eval_suites, suite_settings

if TYPE_CHECKING:
    from runner.spec import Spec

Problems = list[tuple[str, str]]


def _loc(loc: tuple[Any, ...]) -> str:
    """The YAML path of an error location ("train.lora.r", "data.sources[0].path")."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith(("function-after[", "function-before[")):
            continue
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,80}", part):
            out += ("." if out else "") + part
        else:
            out += f"[{short_repr(part)}]"  # an odd key ('', 'a.b', '\r', true, a long one) stays short, on one line
    return out

# --- duplicate keys ------------------------------------------------------------------------------

_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (merge keys and aliases included), recording the mapping keys a document
    gives twice: PyYAML keeps the last silently, so a second `train:` block replaced the first."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        self.duplicates = _duplicates(self, node)
        return self.construct_document(node)


def load_yaml(text: str) -> tuple[Any, Problems]:
    """The document and its duplicate keys as problems ("train", "duplicate key (lines 12 and 40)").
    Raises what yaml.safe_load raises."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
        return data, getattr(loader, "duplicates", [])
    finally:
        loader.dispose()


def _duplicates(loader: _Loader, root: yaml.Node) -> Problems:
    """Every key given twice in one mapping, at any depth, in line order. Each node is visited once:
    aliases share nodes, so a billion-laughs document is walked in linear time."""
    found, seen, stack = [], set(), [((), root)]
    while stack:
        path, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [((*path, i), v) for i, v in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for k, v in node.value:
                if k.tag == _MERGE:  # `<<: *base`: its keys may be overridden, that is what it is for
                    stack.append((path, v))
                    continue
                key = _key(loader, k)
                line = k.start_mark.line + 1
                if key in lines:
                    found.append((line, _loc((*path, key)), f"duplicate key (lines {lines[key]} and {line})"))
                else:
                    lines[key] = line
                stack.append(((*path, key), v))
    return [(p, msg) for _, p, msg in sorted(found, key=lambda f: f[0])]


def _key(loader: _Loader, node: yaml.Node) -> Any:
    """A mapping key as the document means it (`a` and `"a"` are one key; `1` and `"1"` two); a key
    that is not a hashable scalar is its node (never a duplicate: PyYAML refuses it anyway)."""
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_object(node)
        try:
            hash(value)
            return value
        except TypeError:
            pass
    return node


# --- budgets -------------------------------------------------------------------------------------

# A request's prompt gets what the engine's max_model_len leaves after its output budget, and the
# engines cut longer prompts from the start (runner.engines.base.truncate_left). A one-line question
# in SmolLM2's chat template is about 40 tokens; less than 64 left would cut nearly every prompt,
# so such a budget is a mistake, not a choice.
MIN_PROMPT_TOKENS = 64


def budget_problems(spec: Spec) -> Problems:
    """Output budgets that leave too little of an engine's context for the prompt, and pair pools
    capped below the subset size that curation must fill."""
    st = suite_settings(spec)
    scorers = [j[0] for s in eval_suites(spec) if (j := suite_registry.get(s).judge(st)) and j[0]]
    budgets = [("generate.sampling.max_tokens", spec.generate.sampling.max_tokens, [m.name for m in spec.models]),
               ("annotate.sampling.max_tokens", spec.annotate.sampling.max_tokens, spec.annotate_judges()),
               ("score.sampling.max_tokens", spec.score.sampling.max_tokens, scorers)]
    problems: dict[tuple[str, str], str] = {}  # one per (budget, engine section)
    for field, n, models in budgets:
        for model in models:
            section, engine = spec.engine_for(model)
            room = engine.max_model_len - n
            if room < MIN_PROMPT_TOKENS:
                problems[(field, section)] = (
                    f"{n} leaves {max(room, 0)} of {section}.max_model_len ({engine.max_model_len}) for the prompt of "
                    f"{model!r}; leave at least {MIN_PROMPT_TOKENS} (longer prompts are cut from the start)")
    return [(path, msg) for (path, _), msg in problems.items()] + _pool_problems(spec)


def _pool_problems(spec: Spec) -> Problems:
    """Value subsets are drawn from the annotated pairs: a cap below the size they need fails in
    curation, after annotation has been paid for."""
    d, a = spec.data, spec.annotate
    caps = {"annotate.max_pairs": a.max_pairs} if a.max_pairs else {}
    if all(s.max_pairs for s in d.sources):
        caps["the sum of data.sources[].max_pairs"] = sum(s.max_pairs for s in d.sources)
    if not caps:
        return []
    why, cap = min(caps.items(), key=lambda kv: kv[1])
    field, need = (("data.subset_size", d.subset_size) if isinstance(d.subset_size, int)
                   else ("data.min_subset_size", d.min_subset_size))
    if need <= cap:
        return []
    return [(field, f"{need} pairs per value, but {why} gives at most {cap} pairs in all")]


# --- primary judges ------------------------------------------------------------------------------

def primary_judge_problems(spec: Spec) -> Problems:
    """analyze.primary_judges as the analysis applies it (evaluation.analyze.mark_primary): for each
    scored (suite, metric) the first matching key wins and must name one of that metric's judges
    (whole, or the part before ":" that names the engine); a key that matches nothing is a typo."""
    keys = spec.primary_judges()
    user = spec.analyze.primary_judges
    used: set[str] = set()
    problems: dict[str, str] = {}
    for suite, metric, judges in _scored(spec):
        key = next((k for k in keys if _matches(k, suite, metric)), None)
        if key is None:
            continue
        used.add(key)
        name = keys[key]
        if key in user and key not in problems and name not in judges and name.split(":")[0] not in judges:
            problems[key] = (f"{name!r} does not score {suite}/{metric or '*'}; its judges here: "
                             f"{', '.join(sorted(judges))}")
    for key in user:
        if key not in used:
            suites = sorted({s for s, _, _ in _scored(spec)})
            problems[key] = (f"matches no metric this study scores: a suite ({', '.join(suites)}) or a "
                             "\"suite/metric\" pattern")
    return [(_loc(("analyze", "primary_judges", k)), msg) for k, msg in problems.items()]


def _scored(spec: Spec) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """(suite, metric, judge names) this study scores; the QA benchmarks' metrics are lm-eval's
    (None: any), all judged by it."""
    st = suite_settings(spec)
    out = [(s, m, js) for s in eval_suites(spec) for m, js in suite_registry.get(s).judges(st).items()]
    return out + ([(QA_SUITE, None, (QA_JUDGE,))] if spec.score.benchmarks else [])


def _matches(key: str, suite: str, metric: str | None) -> bool:
    if key == suite:
        return True
    return key.startswith(f"{suite}/") if metric is None else fnmatch(f"{suite}/{metric}", key)
