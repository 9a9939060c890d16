from alignline.cli import main

main()
