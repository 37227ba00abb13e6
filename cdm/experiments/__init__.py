"""CDM's claims at CPU scale: experiments on the shipped demo cascade, re-runnable and resumable.

One module per experiment (its constants, run, report and plot), `common` for what they share, and
`suite` for the list of them and the report page. `python -m cdm.cli.experiments` runs them.
"""
