"""One option block made into one spec: how ``evaluation_options`` and ``compare_options`` add their options to a
command and hand it the spec they make (validated there, once)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


def spec_options(options: dict[str, tuple[Any, Any]], spec_class: Callable[[], type], what: str,
                 position: Callable[[list[inspect.Parameter]], int]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding ``options`` (name -> (annotation, typer.Option)) to a command's signature at
    ``position(its own parameters)``; the command's first parameter receives them as ``spec_class()(**values)``
    (``spec_class`` returns the class on first use, so ``--help`` imports no spec module)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(command).parameters.values())[1:]  # the first is the spec
        clash = {p.name for p in own} & set(options)
        if clash:
            raise TypeError(f"{command.__name__} declares {what} options itself: {', '.join(sorted(clash))}")
        kw = inspect.Parameter.KEYWORD_ONLY
        own = [p.replace(kind=kw) for p in own]
        at = position(own)
        added = [inspect.Parameter(name, kw, annotation=annotation, default=default) for name, (annotation, default) in options.items()]

        @functools.wraps(command)
        def with_options(**values: Any) -> Any:
            spec = spec_class()(**{name: values.pop(name) for name in options})
            return command(spec, **values)

        with_options.__signature__ = inspect.signature(command).replace(parameters=[*own[:at], *added, *own[at:]])  # type: ignore[attr-defined]
        return with_options

    return decorate
