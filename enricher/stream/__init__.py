"""The stream, message to enriched rows: the message contract and its formats
(contract), a batch's way through parse -> enrich -> write (batch, enrich),
the artifacts serving (serving), dead letters (deadletters), topics, the
producer, and the pinned Faust adjustments (faust_patches)."""
