"""The study's plan and its ledger: which trials a study has (its identities), which of them
finished, diverged or continue from a checkpoint (``ledger``), the Tune session an invocation
runs in (``sessions``), the lease that lets one invocation run a study at a time (``lease``), and
which trials train together as packs (``packing``). Below Ray: read by the driver before Tune
starts."""
