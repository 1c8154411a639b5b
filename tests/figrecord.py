"""What the report's and the compare page's figures hand to matplotlib, recorded for comparisons.

``record(monkeypatch)`` wraps Axes.imshow, Axes.contour, Axes.set_title and Axes.text: every call
appends (kind, value) to the returned list (images, kind 'imshow <cmap name>', as float64 arrays with
NaN where masked; contour inputs as arrays, each followed by ('contour style', "colors=... linewidths=...
linestyles=...") ; titles and texts as strings) and then draws as usual.
"""

import numpy as np


def record(monkeypatch) -> list[tuple[str, object]]:
    from matplotlib.axes import Axes

    calls: list[tuple[str, object]] = []
    real = {name: getattr(Axes, name) for name in ("imshow", "contour", "set_title", "text")}

    def imshow(self, x, *args, **kw):
        cmap = kw.get("cmap")
        calls.append((f"imshow {getattr(cmap, 'name', cmap)}",
                      np.ma.filled(np.ma.asarray(x).astype(np.float64), np.nan)))
        return real["imshow"](self, x, *args, **kw)

    def contour(self, *args, **kw):
        calls.append(("contour", np.asarray(args[0], dtype=np.float64)))
        calls.append(("contour style", " ".join(f"{k}={kw.get(k)}" for k in ("colors", "linewidths", "linestyles"))))
        return real["contour"](self, *args, **kw)

    def set_title(self, label, *args, **kw):
        calls.append(("title", str(label)))
        return real["set_title"](self, label, *args, **kw)

    def text(self, x, y, s, *args, **kw):
        calls.append(("text", f"{x:.3f} {y:.3f} {s}"))
        return real["text"](self, x, y, s, *args, **kw)

    for name, fn in (("imshow", imshow), ("contour", contour), ("set_title", set_title), ("text", text)):
        monkeypatch.setattr(Axes, name, fn)
    return calls


def assert_same_figures(a: list, b: list, *, image_check) -> None:
    """Two recordings draw the same figures: the same calls in the same order, titles, texts and
    contour inputs and styles identical, images compared by ``image_check(a, b, kind)`` (same shape asserted
    first)."""
    assert [k for k, _ in a] == [k for k, _ in b]
    for (kind, x), (_, y) in zip(a, b):
        if kind in ("title", "text", "contour style"):
            assert x == y
        elif kind == "contour":
            np.testing.assert_array_equal(x, y)
        else:
            assert x.shape == y.shape
            image_check(x, y, kind)
