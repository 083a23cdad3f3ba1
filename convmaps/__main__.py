from convmaps.cli import main

main()
