"""`make run`: the whole service on one machine, with nothing to install by hand."""
