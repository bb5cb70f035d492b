"""The concept atlas on the application side: its HTML page, the `relprop concepts` and
`relprop collect-concepts` commands and the demo step, built on relprop.concepts."""
