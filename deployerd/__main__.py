from deployerd.cli import main

main()
