"""Words of TextWorld games that the tiny model's built-in vocabulary lacks (``tiny-textworld``).

The words of TextWorld 1.7's text grammars (``textworld/generator/data/text_grammars/*.twg``,
every room, object and quest phrase a generated game can use) and of the game responses seen in
random play of 28 generated games (Inform 7's standard messages: "That's not a verb I
recognise.", "You can't go that way." ...), lowercased, the words of
:class:`~llamagym_pl.agents.textworld.TextWorldAgent`'s prompt and the punctuation ``=`` and ``*``
(room headers ``-= Kitchen =-``, ``*** The End ***``), minus the words
:func:`llamagym_pl.tiny_model.tiny_vocab` already has, sorted. The list is fixed here rather than
read from the installed package so that token ids, and so checkpoints, do not depend on the
TextWorld version. Append new words at the end only.
"""

WORDS = """
* 01 010 011 012 013 014 015 016 017 018 019 02 020 021 022 023 024 025 026 027 028 03 04 05 06 07
08 09 0a 0b = a1 a2 a3 a4 a5 a6 able about absolutely absurdly accomplish accomplished accounted
achieve achieved act add adds adj adjective adjectives advent adventure affixed afriend afterhave
against aging ago ah ajar alarmingly already alright alt aluminum amazing american amount ancient
angry announce ansmell antiquated antique antiqued anything apologise appealing appears append
appended appetizing apple appliance appliances area aren arguably armchair around arrive ascertained
ask asmell assure ate atmosphere attack attempt attention attic aunt austere available aw away
awesome awful awkward b b1 b2 b3 b4 b5 backup bag balanced balmy balsam banana bank bar barely base
basement basket bathroom bats bear bed bedchamber bedroom beech beetles begin begood behind believe
bench bend berry besides big bignumber bigshot binder birch bits black blanket blender blocking
board book bookshelf bored bowl boysen brand brandname brass bread break broccoli broken broom
brother brown brushed bucks buddy bug bugobject bugs building built bump bunnies bureau burg burger
burn butter butterfly button buy c c1 c2 c3 c4 c5 c6 c7 c8 c9 cabbage cabinet cake calendar call
calling came canadian candy cane cannot canshould cantaloupe canteen caring carried carrot case
cashew cat caterpillars cauliflower cd cedar ceiling cellar chair chamber changes changing
chartreuse cheap check chilled chipped chocolate city classic clean cleaning clearancelevel clearly
climb cloak closed closely closet closing clothing clove club coconut code coffee coffer coincidence
cold colour come comfortable comfy comic coming command commanding commands company compass complete
composed compound computer concealed confused consumed contain contained container
containerdescription containers contains contemporary content contents contentsc contentss
controller cook cookery cookhouse cookie cooking cool cooljob copper corner couch couldn counter
course cousin cozy crack cramped cran crate create creates creating crooked crowded cubicle cuboid
cucumber cup cupboard cushion cut cute cyan d d0 d1 d2 d3 d4 dad dairy damp dangerous date day deal
dec decide decides decorated decrepit definitely delectable delicious depending deposit deposited
depressed desc describe describes description descriptions descriptor descriptors desk desktop
destroy device different difficult difficulty digit digit1 digit2 dir direction dirty discovery dish
disk dispenser display displayed disposable ditch ditched doesn doing dollars don doors doublecheck
doubled drawer drawn dreadful dream dresser dried dropped dropping drowsy dry dump durable durian
dusty dvd e e1 earwigs easy0a easy0b easy1 easy2 easy21 easy22 easy3 eaten eccentric edible edition
effort eighty elder electronic elegant elsewhere embroidered empty empty1 empty10 empty11 empty12
empty13 empty14 empty15 empty16 empty17 empty18 empty19 empty2 empty20 empty21 empty22 empty23
empty24 empty25 empty26 empty27 empty28 empty29 empty3 empty30 empty31 empty32 empty33 empty34
empty35 empty36 empty37 empty38 empty39 empty4 empty40 empty41 empty42 empty43 empty44 empty45
empty46 empty47 empty48 empty49 empty5 empty50 empty51 empty52 empty53 empty54 empty55 empty56
empty57 empty58 empty59 empty6 empty60 empty61 empty62 empty63 empty7 empty8 empty9
emptyinstruction1 emptyinstruction10 emptyinstruction2 emptyinstruction3 emptyinstruction4
emptyinstruction5 emptyinstruction6 emptyinstruction7 emptyinstruction8 emptyinstruction9 emptymain
emptymainperiod emptyreaction emptysupporter enormous enough ensure enter entered entertaining
entrance entrances entranceway epilogue especially etc euclidean even ever everything ex examination
examine examining examples except excited excitement exciting exclamation exit exits expandable
expandables expanding expect expensive expensiveplace experience explore exterior eye f f1 f2 f3 f4
f5 f6 facing fallen familiar famous fan fancy fantastic far fashionable fast feeling fifty filled
filthy fine finger finish fire fit fitting fix fixed flat flavour flexible flickers floods floor fly
folder folks follow followed follows fondue food force forgotten fork formless forty foundin framed
freezer fresh fridge friend friendcompany friendplace friends friendtype frilly frisbee fruit fudge
fulfillment fun functions furious g g1 gain garage garbage garlic gate gateway gaudy gaze general
generates gets getting gigantic given glass gleam gloomy glove glued going goji golf gone goose
gotten government grain grammar grand grape greasy great greeting greetings gross grotesque ground
group grubs guarded guess gummy h h1 h2 h3 h4 half hall hamlet hammered handled hangs happen
happened happens happy hard1 hard2 hard3 hasn hat hatch haven havepicked havetaken having head
heading headphones hear heartwarming heavenly heavier heavy hefty held hello henderson hey hideous
hilarious hits hm hmm hmmm holds home honeydew honoured hope hopefully hopes horrible hot however
hub huckle huge huh hundred i7 idea idly ie ig iknow immaculate imposing impossible inadvertently
inappropriate include indefinite inedible inform7 inform7a inform7noa inform7noun inform7nounnoa
information infuriated init inlaw insect insects insert inserted inserting inside interact
interesting internet intheblank intriguing intro introducing inviting iron isn itself j jump junk k
kettle keyboard keycard keys kind kitchenette kittens kiwi knew knife know l ladle laminated
lampshade laptop large larva lastly latchkey later launderette laundromat laundry lavender law
leading leads lean least leave leaving legume length let letdown letter levels licorice lid lie lies
life lift light lightbulb like limited lingon list listed listing listwithis lit little ll loaf lock
locked locker locking logan long longer looking looks lookthere lots loudly lounge lovely luxurious
lying m machine made madeof mahogany manage manageable mantelpiece mantle manuscript many maple
marbled mark massive mat match matched maturing mayor mean medium1 medium2 medium3 meet melon
memories mental mentioned messed messy meta metal microsoft mid middle mind minister miss misty
modern modest mom monitor mood mop moredifficult mouse movies much mug multi multiple myfriend n
name names napkin nearby neglected neighbour nest neutral newsentence nice nightmare ninety noble
noise non nondescript normal note notice noticed noun nouns novel number o oak obj objective objects
obligated oddly off offered offers office ofyouryouth oh old ominous once ones onion openable
opencontainer opened opening opens operational orange ordinary organic ornate otherwise out outmoded
owner p paced pair paired pairing pal pan pantry pants paper paperproducts parlor part passageway
passes passkey pay peanut pear pedestal pen pencil period person physical picked picking picture
piece pillow pine pit pizza placard place placed places placing plain plainly plant plastic plate
platter playful playing playroom pleasant pleased plus plush poem polished portal portmanteau
possible possibly post potato practically prefix prefixes presented president pressing pretty
prevent previous price pricebad pricefriend pricegood pricetagexplain prime print printer probably
profound prologue protected protein pulled pulling punctuation pungent puppies pureed purple purpose
putting pyramid q quest quit quote r races rack rasp re ready really recliner recognise recover
recreation rectangular refrigerator reg relaxing reliable remember reminded reminds reminiscent
repulsive required resourcenumber rest restart restaurant resting restore restroom retrieve reveal
revealed revealing reveals revisit revisiting rhetorical riddled ridiculous ripped robust roommate
rooms roomtype roomy rotting rough rugged ruin rules rusty s salad salon sandwich satin saucepan
sauna saunas saunter sauntered saved savory says scan scarf scented schtick scored screen scullery
scurries seconds secret sector seeing seem seems seen self separate separator separators seperator
serious session set setting seventy shadfly shaky shape shelf sheltered shelters shiny shirt shock
shoddy shoe shortcuts shouldn show shower shown shrimp shudder shut shutting sickening sign
signboard signquality silent silly similar simple simpleadj sister sit sixty sizable slab sleep
sleepy small smashing smell smelltype snack snippets soap soaped sock soft solid solidly someone
something sometimes somewhere sorry sort sound spacious spare special specific spherical spiders
spin splintery sponge spoon spork spot spotless stable stained standard staple stapler stealing
steam steamy steel stern stock stoked stone storage store strange straw strawberry strip stripped
strong studio study stuff stuffed stuffy stumbled sturdy style subdivide subtypes succeed such
sudden suddenly suffix suffixes suitcase super superficially supp support supporter supporters sure
surprisingly surroundings swear sweaty symbols syn synonym synthesizer t tablet tacky tag taken
taking tantalizing tasty tea teacup teal teapot teaspoon technique tee telephone tell tells
templates tempting terrible terror text textbook textworld thanks thing things thinking thirty
though thought through throw throwing ticks tie time tiny tip toads today token tokens toolbox top
torn toss tossed touch towel towering town trash travel travelled trip trouble trunk truth tryto
turns tv type type1 type2 types typical typically typo u ugly unbelievable unblocked uncle
undependable understood undo unexpected unfortunately unguarded unlock unlocked unlocking
unnecessary unreasonably unremarkable unstable until unvisited upon uppercase upset upsettingly
upsetwith used useful useless using usual usually utensil v vacuum val values vanilla var variants
vault ve vegetable venture ventured verb vessel vibes village ville violence violet virtual visited
w walked walking walnut wanting warm washroom waste watermelon wave way wear weight weighty weird
welcome welded weren whisk wide widescreen winner within wobbly wonder wonderful wondering wood
wooden work workbench working works workshop world worm worn worry worst wow wretched wriggling x y
youknow yourself yourthing youth z zone
""".split()
