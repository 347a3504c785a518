"""The public surface: ``safeshift.__all__`` lists exactly the public names, sorted."""

from __future__ import annotations

import safeshift


def test_all_is_sorted_and_complete() -> None:
    assert list(safeshift.__all__) == sorted(safeshift.__all__)
    import inspect

    public = {n for n in dir(safeshift) if not n.startswith("_") and n != "Any"
              and not inspect.ismodule(getattr(safeshift, n))}
    public.add("__version__")
    assert public == set(safeshift.__all__)
    for name in safeshift.__all__:
        assert getattr(safeshift, name) is not None


def test_errors_share_one_root() -> None:
    import inspect

    from safeshift import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, Exception) and c.__module__ == errors.__name__]
    assert len(classes) > 8
    assert all(issubclass(c, safeshift.SafeshiftError) for c in classes)
    for c in classes:
        assert c.__name__ in (errors.__doc__ or ""), f"{c.__name__} missing from the error tree"
