"""One registry type for everything a plugin can add (suites, judges, preference sources, losses),
and the plugin hook: an installed package declares an entry point in the group `valind.plugins`
whose module registers its things when imported.

    [project.entry-points."valind.plugins"]
    my-suite = "my_package.suite"

Every registry loads the plugins (once per process) before it answers a lookup, so `valind run`,
`plan`, `judge`, `validate`, `rehearse` and the report see a plugin's suite like a built-in one."""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

GROUP = "valind.plugins"
_plugins_loaded = False
_loading: list[str] = []  # the plugin being imported: what it registers is marked as its own


class PluginError(ImportError):
    """A plugin failed to load: the message names it and its entry point."""


def load_plugins() -> list[str]:
    """Import every `valind.plugins` entry point's module, once per process; the names loaded."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True  # first: a plugin importing a registry must not load the plugins again
    names = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        where = f"{ep.dist.name} " if ep.dist is not None else ""
        _loading.append(ep.name)
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception as e:
            raise PluginError(f"valind plugin {ep.name!r} ({where}entry point {ep.value!r}) failed to load: "
                              f"{type(e).__name__}: {e}") from e
        finally:
            _loading.pop()
        names.append(ep.name)
    return names


def import_package(package: str) -> None:
    """Import a package and each of its modules whose name does not start with "_"."""
    pkg = importlib.import_module(package)
    for m in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        if not m.name.startswith("_"):
            importlib.import_module(f"{package}.{m.name}")


class Registry(Generic[T]):
    """Named things of one kind. `kind` names them in errors ("suite", "loss"). `builtins`: the
    module or package whose import registers the built-in ones, imported at the first lookup (so
    the registry's own module imports none of them, and they may import what imports it)."""

    def __init__(self, kind: str, builtins: str | None = None) -> None:
        self.kind, self.builtins = kind, builtins
        self._items: dict[str, T] = {}
        self._plugin: dict[str, str] = {}  # name -> the plugin that registered it
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            if self.builtins:
                import_package(self.builtins)
            load_plugins()

    def add(self, name: str, thing: T) -> T:
        """Register `thing` as `name`; a second, different thing under one name is refused (the same
        one again is not: a module imported twice registers twice)."""
        old = self._items.get(name)
        if old is not None and old is not thing and old != thing:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = thing
        if _loading:
            self._plugin[name] = _loading[-1]
        return thing

    def plugin(self, name: str) -> str | None:
        """The plugin (entry point name) that registered `name`; None for a built-in one."""
        return self._plugin.get(name)

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator: `@LOSSES.register("dpo")` over a function or class."""
        def deco(thing: T) -> T:
            return self.add(name, thing)
        return deco

    def get(self, name: str, *default: T) -> T:
        """The thing registered as `name`; unknown: `default` when given, else a KeyError naming the known ones."""
        self._load()
        if name not in self._items and default:
            return default[0]
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items)) or 'none'}")
        return self._items[name]

    def remove(self, name: str) -> None:
        """Unregister (tests that register something for one test)."""
        self._items.pop(name, None)

    def names(self) -> list[str]:
        return [n for n, _ in self.items()]

    def items(self) -> list[tuple[str, T]]:
        """Built-in ones, then the plugins', each by name: the order never depends on which module was
        imported first (a spec's default suite list, and so its keys, stay the same)."""
        self._load()
        return sorted(self._items.items(), key=lambda kv: (kv[0] in self._plugin, kv[0]))

    def values(self) -> list[T]:
        return [t for _, t in self.items()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, thing: T) -> None:
        """Replace (tests: monkeypatch.setitem); `add` is the checked way in."""
        self._load()
        self._items[name] = thing

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def copy(self) -> dict[str, T]:
        """A snapshot (tests restore it)."""
        self._load()
        return dict(self._items)

    def restore(self, snapshot: dict[str, T]) -> None:
        self._items = dict(snapshot)
