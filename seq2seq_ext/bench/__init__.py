"""Reference-vs-extension benchmarks: the cases (``common``) and the side-by-side ratio table
(``compare``, also ``seq2seq-ext bench`` and ``make bench``)."""
