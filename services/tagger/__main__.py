from services.tagger.worker import main

main()
