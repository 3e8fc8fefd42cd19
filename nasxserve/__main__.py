from nasxserve.cli import main

main()
