"""The paper's own Frozen Lake (ACL 2025 §5.3, App. B.2): a Markov policy over grid states, scored by
the distance of its state-transition matrix to the optimal policy's (commands/run_frozen_lake_paper.sh)."""
