"""Progress bars for long work: tqdm when installed, a quiet stand-in otherwise."""


class _Silent:
    def __init__(self, total=None, **_):
        self.total = total

    def update(self, n=1):
        pass

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


def progress_bar(total=None, desc=None, unit="it", enabled=True):
    """A tqdm bar (to stderr) or, without tqdm or when disabled, an object with the same methods."""
    if not enabled:
        return _Silent(total)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent(total)
    return tqdm(total=total, desc=desc, unit=unit, leave=False)
