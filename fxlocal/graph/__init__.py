"""Pure passes over a torch.fx graph, importing nothing above them: ``trace`` (with ``atoms``,
the module tree's units), ``candidates`` (where one tensor is live), ``units``, ``cost``
(FLOPs, saved bytes, time, a step's memory), ``analyze`` (all of those as one
``GraphAnalysis``), ``partition`` (the balanced K-way split, a ``Plan``: ``plan``), ``split``
(one GraphModule per block), ``regions`` and ``recompute`` (a block recomputed unit by unit)."""
