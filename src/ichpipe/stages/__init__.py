"""The pipeline's stages, one module each, each run by one script: preprocess, train, embed, sequence, blend, ensemble,
report, bundle, search, predict, evaluate. A stage imports every layer below it and never another stage: what two
stages share moves down."""
