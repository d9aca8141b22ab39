"""One experiment, in data-flow order: config → prepare → trainer → metrics → tracking."""
